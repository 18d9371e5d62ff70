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
        job = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))), job)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def owns(self, ordinal: int) -> bool:
        return ordinal % self.world == self.rank


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
