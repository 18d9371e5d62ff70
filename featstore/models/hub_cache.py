"""``hf:ORG/NAME[@REVISION]``: a model folder in the local Hugging Face hub cache, found offline.

The cache is where ``huggingface_hub`` puts downloads, located by its own rules: ``$HF_HUB_CACHE``,
else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``. A model lives in ``models--ORG--NAME/`` with ``refs/<branch or
tag>`` (a file holding a commit hash) and ``snapshots/<commit>/`` (the files, links into ``blobs/``).
Nothing is ever downloaded: a model or revision that is not there is an error naming the command
that fetches it. Torch-free and huggingface_hub-free: it is only path logic.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatstoreError, UsageError

PREFIX = "hf:"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")


@dataclass(frozen=True)
class HubModel:
    """A model folder resolved from the hub cache."""

    repo_id: str  # ORG/NAME
    revision: str  # as asked ("main" by default)
    commit: str  # the snapshot's commit hash
    folder: Path  # .../models--ORG--NAME/snapshots/<commit>
    ref_file: Path | None  # refs/<revision> when the revision is a branch or tag: stamped, a new download moves it
    how: str  # how the snapshot was chosen, for the log

    @property
    def fetch_command(self) -> str:
        return download_command(self.repo_id, self.revision)


def is_hub_name(name: str) -> bool:
    return name.startswith(PREFIX)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, by its precedence of environment variables."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def download_command(repo_id: str, revision: str = "main") -> str:
    rev = "" if revision == "main" else f" --revision {revision}"
    return f"`hf download {repo_id}{rev}` (huggingface_hub's CLI; older versions: `huggingface-cli download {repo_id}{rev}`)"


def parse_hub_name(name: str) -> tuple[str, str]:
    """(repo id, revision) of ``hf:ORG/NAME[@REVISION]``."""
    body = name[len(PREFIX) :] if is_hub_name(name) else name
    repo_id, _, revision = body.partition("@")
    if not _REPO.fullmatch(repo_id) or (body.count("@") and not revision):
        raise UsageError(
            f"--model {name!r} is not a hub model name", "write hf:ORG/NAME or hf:ORG/NAME@REVISION, e.g. hf:facebook/dinov2-small"
        )
    return repo_id, revision or "main"


def resolve_hub_model(name: str) -> HubModel:
    """The snapshot folder of ``hf:ORG/NAME[@REVISION]`` in the local cache, or a one-line error.

    No revision: the commit ``refs/main`` names (what huggingface_hub itself loads offline); a cache
    without ``refs/main`` (a folder copied by hand) gives its newest snapshot. ``@REVISION`` is a
    branch or tag (``refs/REVISION``), or a commit hash or a unique prefix of one.
    """
    repo_id, revision = parse_hub_name(name)
    cache = hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    have = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.name) if snapshots.is_dir() else []
    if not have:
        raise FeatstoreError(
            f"{repo_id!r} is not in the Hugging Face cache ({cache}); featstore never downloads",
            f"run {download_command(repo_id, revision)} on a machine with network, or point HF_HUB_CACHE / HF_HOME at a cache that has it",
        )
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        folder = snapshots / commit
        if not folder.is_dir():
            raise FeatstoreError(
                f"{repo_id!r}: refs/{revision} names commit {commit[:12]}, which has no snapshot in {repo}",
                f"run {download_command(repo_id, revision)} again to complete the download",
            )
        return HubModel(repo_id, revision, commit, folder, ref, f"refs/{revision} -> {commit[:12]}")
    if _COMMIT.fullmatch(revision):
        matches = [p for p in have if p.name.startswith(revision)]
        if len(matches) == 1:
            return HubModel(repo_id, revision, matches[0].name, matches[0], None, f"commit {matches[0].name[:12]}")
        if len(matches) > 1:
            raise UsageError(
                f"revision {revision!r} of {repo_id!r} matches {len(matches)} snapshots", "give more characters of the commit hash"
            )
    if revision == "main":
        newest = max(have, key=lambda p: p.stat().st_mtime)
        return HubModel(repo_id, revision, newest.name, newest, None, f"newest snapshot {newest.name[:12]} (no refs/main)")
    refs = (
        sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
        if (repo / "refs").is_dir()
        else []
    )
    known = ", ".join(refs + [p.name[:12] for p in have])
    raise FeatstoreError(
        f"revision {revision!r} of {repo_id!r} is not in the Hugging Face cache (it has: {known})",
        f"run {download_command(repo_id, revision)} on a machine with network, or pick a revision the cache has",
    )
