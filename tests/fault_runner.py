"""Run `featstore` in this process with a fault injected, for the crash tests.

python -m tests.fault_runner kill-in-unit K   -- featstore args…   SIGKILL halfway through writing unit #K
python -m tests.fault_runner kill-in-finalize STAGE -- featstore args…   SIGKILL inside finalize
python -m tests.fault_runner slow-units SECONDS -- featstore args…   sleep before every unit write
python -m tests.fault_runner none 0 -- featstore args…
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    mode, param = argv[0], argv[1]
    args = argv[argv.index("--") + 1 :]
    from featstore.cli import main as cli_main
    from featstore.store import feature_store as store_module

    Store = store_module.FeatureStore
    if mode == "kill-in-unit":
        target = int(param)
        original = Store.write_unit
        counter = {"n": 0}

        def write_unit(self, unit, features, valid, invalid=None, **augmented):
            if counter["n"] == target:
                # half of the first view's rows, then death: a torn unit with no marker
                view = next(iter(features))
                half = unit.start + max(1, unit.rows // 2)
                self._group[unit.split]["features"][view][unit.start : half] = np.asarray(features[view][: half - unit.start])
                _die()
            counter["n"] += 1
            return original(self, unit, features, valid, invalid, **augmented)

        Store.write_unit = write_unit
    elif mode == "slow-units":
        original_slow = Store.write_unit

        def slow_write_unit(self, *a, **k):
            time.sleep(float(param))  # stretch the run so a signal surely lands mid-extraction
            return original_slow(self, *a, **k)

        Store.write_unit = slow_write_unit
    elif mode == "kill-in-finalize":
        original_update = Store.update_attrs

        def update_attrs(self, attrs):
            if param == "before-complete":
                _die()
            original_update(self, attrs)
            if param == "after-complete":
                _die()  # complete is set, progress files still there

        Store.update_attrs = update_attrs
    sys.argv = ["featstore", *args]
    cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
