"""featstore: encode a labelled image dataset once with a frozen encoder into a Zarr store."""

__version__ = "0.1.0"
