"""``probe fit --rerun DIR``: the stores, protocol and options of a finished run, read from its
protocol.json, after checking that every store still holds what it held (its content digest), at
its recorded location or where ``--store LABEL=PATH`` says it moved."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import UsageError
from featstore.store import FeatureStore, is_url

from .protocol import PROTOCOL_VERSION, Protocol
from .provenance import END_CHUNKS, SCHEMES, UNIT_DIGESTS, absolute, environment, schemes_of, store_digest
from .results.runs import PROTOCOL, load_record
from .stores import StoreSpec


@dataclass(frozen=True)
class Rerun:
    """What :func:`probe.fitting.fit_run` needs to repeat a run."""

    stores: list[StoreSpec]
    protocol: Protocol
    views: list[str] | None
    allow_different_data: bool
    command: list[str] | None  # the original command line
    drift: str | None = None  # how the code running the rerun differs from the recorded (version, commit)


def _specs(folder: Path, stores: list[dict]) -> tuple[list[StoreSpec], list[str] | None]:
    """Each store at its recorded absolute location under its recorded label; the views: shared
    ones as ``views``, else each store's single view as its own ``:VIEW``."""
    if not stores or any("location" not in s or "digest" not in s for s in stores):
        raise UsageError(
            f"{str(folder / PROTOCOL)!r} records no store locations and digests (written by an older probe)",
            "run probe fit again with the same options; its protocol.json can then be rerun",
        )
    views = [list(s.get("views") or []) for s in stores]
    if all(v == views[0] for v in views):
        return [StoreSpec(s["location"], label=s["label"]) for s in stores], views[0] or None
    if all(len(v) == 1 for v in views):
        return [StoreSpec(s["location"], label=s["label"], view=v[0]) for s, v in zip(stores, views)], None
    raise UsageError(
        f"{str(folder / PROTOCOL)!r}: stores probed with different sets of views cannot be rerun in one run",
        "rerun each store's views with probe fit --store LABEL=PATH:VIEW",
    )


def relocated(stores: list[dict], moved: Sequence[str]) -> list[dict]:
    """The recorded stores, each one ``moved`` names as ``LABEL=PATH`` (LABEL: its recorded label)
    at PATH instead of its recorded location: a store copied to another folder or machine."""
    labels = [s["label"] for s in stores if isinstance(s.get("label"), str)]
    paths: dict[str, str] = {}
    for text in moved:
        # the longest recorded label the text starts with: a default label may hold a '=' itself
        label = max((x for x in labels if text.startswith(f"{x}=")), key=len, default=None)
        if label is None or text == f"{label}=":
            raise UsageError(
                f"--store {text!r} names no store of the run; it recorded {', '.join(map(repr, labels)) or 'none'}",
                "with --rerun, --store LABEL=PATH gives the store recorded as LABEL its new location",
            )
        if label in paths:
            raise UsageError(f"--store gives store {label!r} two locations", "pass one --store LABEL=PATH per moved store")
        paths[label] = absolute(text[len(label) + 1 :])
    return [{**s, "location": paths[s["label"]]} if s.get("label") in paths else s for s in stores]


def check_unchanged(stores: list[dict]) -> None:
    """Refuse a store whose content digest differs from the recorded one (re-extracted, another
    encoder's weights, other images): the rerun would not repeat the run."""
    for s in stores:
        scheme = s.get("digest_scheme", END_CHUNKS)
        if scheme not in SCHEMES:
            raise UsageError(f"store {s['label']!r}: digest scheme {scheme!r} is not this probe's", "rerun with that version")
        if not is_url(s["location"]) and not os.path.exists(s["location"]):
            raise UsageError(
                f"store {s['label']!r} is not at {s['location']!r}",
                f"moved? give its new location beside --rerun, --store {s['label']}=PATH; it is checked to hold what it held",
            )
        fs = FeatureStore.open(s["location"]).require_complete()
        comparable = scheme in schemes_of(fs)  # a store re-extracted without (or with) unit digests is another store
        now = store_digest(fs, scheme if comparable else None)
        if not comparable or now != s["digest"]:
            raise UsageError(
                f"store {s['label']!r} at {s['location']!r} changed since the run (content digest {s['digest'][:12]}… then, {now[:12]}… now)",
                "a changed store gives other numbers; run probe fit afresh instead of --rerun"
                # an older record's digest counts when the store was extracted: a re-extraction differs too
                + (" (this record's digest, of an older probe, changes with any re-extraction)" if scheme == UNIT_DIGESTS else ""),
            )


def load_rerun(folder: str | os.PathLike, moved: Sequence[str] = ()) -> Rerun:
    """The run recorded in ``folder``/protocol.json, its stores checked unchanged; ``moved``:
    ``LABEL=PATH`` texts, a recorded store's new location (:func:`relocated`)."""
    folder = Path(folder)
    record = load_record(folder)
    recorded = record.get("protocol") or {}
    version = recorded.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise UsageError(
            f"{str(folder)!r} was run under protocol version {version}; this probe trains under version {PROTOCOL_VERSION}",
            "install the featstore version recorded in its protocol.json to repeat it",
        )
    try:
        protocol = Protocol.from_dict(recorded)
    except UsageError as e:  # a hand-edited value: name the file it is in
        raise UsageError(f"{str(folder / PROTOCOL)!r}: {e.message}", "the file was edited; run probe fit afresh") from None
    if record.get("protocol_hash") and protocol.hash != record["protocol_hash"]:
        raise UsageError(
            f"{str(folder / PROTOCOL)!r}: its protocol hashes to {protocol.hash}, not the recorded {record['protocol_hash']}",
            "the file was edited or written by another version; run probe fit afresh",
        )
    run = record.get("run") or {}
    stores = relocated(run.get("stores") or [], moved)
    specs, views = _specs(folder, stores)
    check_unchanged(stores)
    return Rerun(specs, protocol, views, bool(run.get("allow_different_data")), run.get("command"), code_drift(run))


def code_drift(run: dict) -> str | None:
    """``recorded with featstore 0.1.0 at commit 1a2b3c4d5e6f, rerun with … at …`` when the
    version or the commit differs from the recorded one (numbers may then differ); else None."""
    now = environment(None)
    then = (run.get("featstore_version"), run.get("git_commit"))
    if then == (now["featstore_version"], now["git_commit"]):
        return None
    words = lambda version, commit: f"featstore {version} at commit {commit[:12] if commit else 'unknown'}"  # noqa: E731
    return f"the run was recorded with {words(*then)}, this rerun runs {words(now['featstore_version'], now['git_commit'])}"
