"""Issue 22's GPU targets judged from one run_gpu.sh call's JSON files.

    python3 benchmarks/gpu/targets22.py $OUT            # reads extract-gpu.json, profile-*.json, ranks.json, forward.json

Prints one line per target with the measured value, and writes ``issue22-targets.json`` beside
them. The targets (benchmarks/RESULTS.md, issue 22):

- steady rate >= 0.9 x min(inference-only, the loader's decode-only rate), every model x set x loader;
- the best loader's steady rate >= 0.75 x inference-only, every model x set;
- end to end >= 4 x the textbook loop (best loader), every model x set;
- DALI's steady rate >= nvJPEG's on every row;
- GPU busy >= 85% of the window in profile_extract.py (every loader profiled);
- two GPUs through torchrun >= 1.8 x one (when the device has two).

It also says which loader ``--loader auto`` should pick on CUDA: the one with the best steady rate
on most rows.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def judge(folder: Path) -> dict:
    checks: list[dict] = []

    def check(name: str, value: float | None, target: float, detail: str = "") -> None:
        met = value is not None and value >= target
        checks.append({"target": name, "value": value, "needs": target, "met": met, "detail": detail})

    extract = load(folder / "extract-gpu.json") or {"results": []}
    rows = extract["results"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["set"]), []).append(r)
    best_loader: Counter = Counter()
    for (model, set_name), group in groups.items():
        for r in group:
            ceiling = min(r["decode"], r["inference"])
            check(f"{model}/{set_name}/{r['loader']}: steady / min(inference, decode)", (r["steady"] or 0) / ceiling, 0.9)
        best = max(group, key=lambda r: r["steady"] or 0)
        best_loader[best["loader"]] += 1
        check(f"{model}/{set_name}: best loader ({best['loader']}) steady / inference", (best["steady"] or 0) / best["inference"], 0.75)
        top = max(group, key=lambda r: r["e2e"])
        check(f"{model}/{set_name}: e2e / textbook ({top['loader']})", top["e2e_over_baseline"], 4.0)
        by = {r["loader"]: r for r in group}
        if "dali" in by and "nvjpeg" in by:
            check(f"{model}/{set_name}: DALI steady / nvJPEG steady", (by["dali"]["steady"] or 0) / (by["nvjpeg"]["steady"] or 1), 1.0)
    for profile in sorted(folder.glob("profile-*.json")):
        report = load(profile) or {}
        for loader, s in report.items():
            window = s.get("gpu_window_s") or 0
            check(f"{profile.stem}/{loader}: GPU busy / window", s["gpu_busy_s"] / window if window else None, 0.85)
    ranks = load(folder / "ranks.json")
    if ranks and "speedup" in ranks:
        check(f"torchrun {ranks['gpus']} GPUs / one", ranks["speedup"], 1.8)
    verdict = {
        "checks": checks,
        "met": sum(c["met"] for c in checks),
        "of": len(checks),
        "auto_on_cuda_should_pick": best_loader.most_common(1)[0][0] if best_loader else None,
        "ranks": ranks,
        "forward": (load(folder / "forward.json") or {}).get("results"),
    }
    return verdict


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out")
    verdict = judge(folder)
    for c in verdict["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(f"{'MET ' if c['met'] else 'not '} {value:>6} (needs >= {c['needs']})  {c['target']}")
    print(
        f"issue 22 GPU targets: {verdict['met']} of {verdict['of']} met; --loader auto on CUDA should pick: {verdict['auto_on_cuda_should_pick']}"
    )
    (folder / "issue22-targets.json").write_text(json.dumps(verdict, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
