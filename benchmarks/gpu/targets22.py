"""Issue 22's GPU targets judged from one run_gpu.sh call's JSON files.

    python3 benchmarks/gpu/targets22.py $OUT --models resnet50,dino --loaders nvjpeg,dali
                                            # reads extract-gpu.json, profile-<first model>.json, ranks.json, forward.json

Prints one line per target with the measured value, and writes ``issue22-targets.json`` beside
them. Every target of every model × set × loader asked for is a line: one not measured (a step cut
off by its cap, a loader that failed or is not installed) is not met, and says why. The targets (benchmarks/RESULTS.md, issue 22):

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

import argparse
import json
from collections import Counter
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


EXPECTED_MODELS, EXPECTED_SETS, EXPECTED_LOADERS = ("resnet50", "dino"), ("upscaled", "224"), ("nvjpeg", "dali")


def judge(folder: Path, models=EXPECTED_MODELS, sets=EXPECTED_SETS, loaders=EXPECTED_LOADERS, profiled: str | None = None) -> dict:
    """Every target of every model × set × loader asked for: one that was not measured (a step cut off
    by its cap, a loader that failed or is not installed) is a check not met, never a check left out."""
    checks: list[dict] = []

    def check(name: str, value: float | None, target: float, detail: str = "") -> None:
        met = value is not None and value >= target
        checks.append({"target": name, "value": value, "needs": target, "met": met, "detail": detail})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    extract = load(folder / "extract-gpu.json") or {"results": []}
    found = {(r["model"], r["set"], r["loader"]): r for r in extract["results"]}
    best_loader: Counter = Counter()
    for model in models:
        for set_name in sets:
            group = {name: found.get((model, set_name, name)) for name in loaders}
            measured = {name: r for name, r in group.items() if r is not None and r.get("steady") is not None}
            for name, r in group.items():
                why = "not measured" if r is None else (r.get("error") or ("no steady rate" if r.get("steady") is None else ""))
                ceiling = min(r["decode"], r["inference"]) if name in measured else None
                check(f"{model}/{set_name}/{name}: steady / min(inference, decode)", ratio(r and r.get("steady"), ceiling), 0.9, why)
            if measured:
                best = max(measured.values(), key=lambda r: r["steady"])
                best_loader[best["loader"]] += 1
                check(
                    f"{model}/{set_name}: best loader ({best['loader']}) steady / inference", ratio(best["steady"], best["inference"]), 0.75
                )
                top = max(measured.values(), key=lambda r: r["e2e"])
                check(f"{model}/{set_name}: e2e / textbook ({top['loader']})", top.get("e2e_over_baseline"), 4.0)
            else:
                check(f"{model}/{set_name}: best loader steady / inference", None, 0.75, "not measured")
                check(f"{model}/{set_name}: e2e / textbook", None, 4.0, "not measured")
            if "dali" in loaders and "nvjpeg" in loaders:
                dali, nvjpeg = measured.get("dali"), measured.get("nvjpeg")
                check(f"{model}/{set_name}: DALI steady / nvJPEG steady", ratio(dali and dali["steady"], nvjpeg and nvjpeg["steady"]), 1.0,
                      "" if dali and nvjpeg else "not measured")  # fmt: skip
    profiled = profiled or (models[0] if models else None)
    report = (load(folder / f"profile-{profiled}.json") or {}) if profiled else {}
    for loader in loaders:
        s = report.get(loader)
        window = (s or {}).get("gpu_window_s") or 0
        value = s["gpu_busy_s"] / window if s and "gpu_busy_s" in s and window else None
        check(
            f"profile-{profiled}/{loader}: GPU busy / window",
            value,
            0.85,
            "" if value is not None else (s or {}).get("error", "not measured"),
        )
    ranks = load(folder / "ranks.json")
    if ranks and "speedup" in ranks:
        check(f"torchrun {ranks['gpus']} GPUs / one", ranks["speedup"], 1.8)
    verdict = {
        "checks": checks,
        "met": sum(c["met"] for c in checks),
        "of": len(checks),
        "not_measured": sum(c["value"] is None for c in checks),
        "partial": bool(extract.get("partial")),
        "auto_on_cuda_should_pick": best_loader.most_common(1)[0][0] if best_loader else None,
        "ranks": ranks,
        "forward": (load(folder / "forward.json") or {}).get("results"),
    }
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="benchmarks/out")
    ap.add_argument("--models", default=",".join(EXPECTED_MODELS), help="the models run_gpu.sh asked for")
    ap.add_argument("--sets", default=",".join(EXPECTED_SETS))
    ap.add_argument("--loaders", default=",".join(EXPECTED_LOADERS), help="every loader a target names (a missing one is not met)")
    args = ap.parse_args()
    folder = Path(args.folder)
    verdict = judge(folder, args.models.split(","), args.sets.split(","), args.loaders.split(","))
    for c in verdict["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(
            f"{'MET ' if c['met'] else 'not '} {value:>6} (needs >= {c['needs']})  {c['target']}"
            + (f"  [{c['detail']}]" if c["detail"] else "")
        )
    print(
        f"issue 22 GPU targets: {verdict['met']} of {verdict['of']} met"
        + (f", {verdict['not_measured']} of them not measured" if verdict["not_measured"] else "")
        + (" (the extraction step was cut short)" if verdict["partial"] else "")
        + f"; --loader auto on CUDA should pick: {verdict['auto_on_cuda_should_pick']}"
    )
    (folder / "issue22-targets.json").write_text(json.dumps(verdict, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
