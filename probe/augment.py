"""Augmented views in ``probe fit`` (#25): whether a run trains on the stores' stored views, and the
views of the rows it trains on.

A store extracted with ``featstore extract --augment rrc-flip --augment-views K`` holds K views of
every train image beside its center crop. With ``--augment on`` (the default) the linear heads
train, each epoch, on one of the K views of each train row, drawn from the seed; selection and
reported rows, k-NN and logistic regression use the center crop. The protocol records what the
run resolved ``on`` to (``rrc-flip:K``), so it enters the hash: a run on views is never ranked
with a run on center crops. Stores with views and stores without (or with another K) in one run
would train under two protocols: that is refused, naming ``--augment off`` as the way to compare
them on center crops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from featstore.errors import UsageError
from featstore.store import FeatureStore

from .protocol import AUGMENT, Protocol, augment_views


def stored_augment(fs: FeatureStore, train_split: str) -> str | None:
    """``<method>:<K>`` of the views ``fs`` holds for ``train_split``; None when it holds none there."""
    info = fs.augment
    if not info or train_split not in info.get("splits", []):
        return None
    return f"{info['method']}:{int(info['views'])}"


def resolve(protocol: Protocol, stores: Sequence[tuple[str, FeatureStore, str]], warn: Callable[[str], None]) -> Protocol:
    """The protocol with ``augment`` resolved for these stores ((path, store, train split) each):
    ``off``, or ``<method>:<K>`` when every store holds the same views; a mix is refused."""
    asked = protocol.augment
    if asked == "off":
        return protocol
    found = {path: stored_augment(fs, split) for path, fs, split in stores}
    kinds = set(found.values())
    if asked not in AUGMENT:  # a recorded run (--rerun): the stores must still hold those views
        missing = [p for p, k in found.items() if k != asked]
        if missing:
            raise UsageError(
                f"the run trained on augmented views {asked}, and store {missing[0]!r} holds {found[missing[0]] or 'none'}",
                "rerun with the stores it used, or fit again with --augment off",
            )
        return protocol
    if "linear" not in protocol.methods or kinds == {None}:
        return protocol.replace(augment="off")  # nothing trains on views: the record says none
    if len(kinds) > 1:
        groups = {k: [p for p, v in found.items() if v == k] for k in kinds}
        described = "; ".join(f"{k or 'no views'}: {', '.join(map(repr, ps))}" for k, ps in groups.items())
        raise UsageError(
            f"the stores hold different augmented views ({described}): trained on them they would not share one protocol",
            "pass --augment off to train every store on its center crops, or extract them all with the same --augment --augment-views",
        )
    seeds = {int(fs.augment["seed"]) for _, fs, _ in stores if fs.augment}
    if len(seeds) > 1:
        warn(
            f"the stores' views were cropped with different seeds ({', '.join(map(str, sorted(seeds)))}): each store trains on its own crops"
        )
    (kind,) = kinds
    assert kind is not None and augment_views(kind) is not None
    return protocol.replace(augment=kind)
