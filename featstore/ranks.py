"""Several processes (torchrun ranks) extracting into one store.

Units are dealt out by their fixed position in the plan (unit ``g`` belongs to rank ``g % world``),
so each rank writes its own chunks and markers and no two ranks ever touch the same file. Rank 0
creates or resumes the store, holds the lock, publishes the job id, and finalizes once every unit
is marked; the other ranks wait for that job id before writing. No torch.distributed is needed:
the store itself is the rendezvous.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import FeatstoreError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    job: str = ""

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))), launch_id(os.environ))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def owns(self, ordinal: int) -> bool:
        return ordinal % self.world == self.rank


def launch_id(env: Mapping[str, str]) -> str:
    """What every rank of one torchrun launch shares and the next launch does not: the run id alone
    is not (a fixed --rdzv-id, as a multi-node recipe has; "none" by default with c10d), and a rerun
    of the same command with --overwrite let a rank find the old store marked with its job, answer
    "up to date" and leave rank 0 waiting forever. torchrun gives each launch its own rendezvous
    port, and each elastic restart its count."""
    run = env.get("TORCHELASTIC_RUN_ID", "")
    return f"{run}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}#{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def wait_until(condition, what: str, timeout: float, poll: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; raise naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FeatstoreError(
                f"timed out after {timeout:.0f} s waiting for {what}", "check that rank 0 is running and writing to the same --out"
            )
        time.sleep(poll)
