"""The installed featstore version (recorded in every store and probe run)."""

__version__ = "0.2.0"
