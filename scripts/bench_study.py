"""A sweep as separate launches against the same sweep as one study, timed in one run.

    python scripts/bench_study.py                       # default job, 4 global batch sizes
    python scripts/bench_study.py --repeats 2 --sizes 16,32,64,128

Separate launches: `dist-trainer train trainer.global_batch_size=B` once per size, each a new
process that starts Ray and its own worker group. One study: `dist-trainer train -m
trainer.global_batch_size=...`, one process, one worker group for all jobs. Both as a user types
them (each into its own temporary MLflow store and Ray storage), timed from process start to
exit; the order alternates over repeats because this machine is shared and noisy.

Training time per job is MLflow's `perf/elapsed_s` at the last step (the loop's own clock).
The target of the studies issue: study <= one start-up + N x (training time + 3 s), where one
start-up is what a separate launch costs beyond its training (the median over launches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("dist-trainer"))


def _train_seconds(store: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "tags.`dist_trainer.role` = 'job'")
    return [r.data.metrics["perf/elapsed_s"] for r in runs]


def _run(args: list[str], folder: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.run(
        [
            CLI,
            "train",
            *args,
            f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
            f"scaling.storage_path={folder / 'ray'}",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def separate(sizes: list[str], extra: list[str]) -> tuple[float, list[float], list[float]]:
    """Total seconds, each launch's seconds, each job's training seconds."""
    launches, training = [], []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
            launches.append(_run([f"trainer.global_batch_size={size}", *extra], Path(tmp)))
            training += _train_seconds(Path(tmp) / "mlflow.db")
    return sum(launches), launches, training


def study(sizes: list[str], extra: list[str]) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        seconds = _run(["-m", f"trainer.global_batch_size={','.join(sizes)}", *extra], Path(tmp))
        return seconds, _train_seconds(Path(tmp) / "mlflow.db")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,32,64,128", help="global batch sizes to sweep")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every job")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    rows = []
    for repeat in range(args.repeats):
        order = ("separate", "study") if repeat % 2 == 0 else ("study", "separate")
        result: dict[str, tuple] = {}
        for kind in order:
            result[kind] = (
                separate(sizes, args.overrides)
                if kind == "separate"
                else study(sizes, args.overrides)
            )
            print(f"repeat {repeat + 1}: {kind} done in {result[kind][0]:.1f} s", flush=True)
        rows.append(result)
    sep_total = statistics.median(r["separate"][0] for r in rows)
    study_total = statistics.median(r["study"][0] for r in rows)
    launches = [s for r in rows for s in r["separate"][1]]
    sep_training = [s for r in rows for s in r["separate"][2]]
    study_training = [s for r in rows for s in r["study"][1]]
    startup = statistics.median(
        launch - train for launch, train in zip(launches, sep_training, strict=True)
    )
    mean_train = statistics.mean(study_training)
    n = len(sizes)
    target = startup + n * (mean_train + 3.0)
    print(f"\n{n}-job sweep ({args.sizes}), medians over {args.repeats} repeat(s)\n")
    print("| | seconds |")
    print("|---|---|")
    print(f"| separate launches, total | {sep_total:.1f} |")
    print(f"| one study, total | {study_total:.1f} |")
    print(f"| speed-up | {sep_total / study_total:.2f}x |")
    print(f"| one launch's start-up (launch - its training) | {startup:.1f} |")
    print(f"| training per job in the study (mean) | {mean_train:.1f} |")
    print(f"| target: start-up + {n} x (training + 3 s) | {target:.1f} |")
    verdict = "met" if study_total <= target else "missed"
    print(f"\nstudy {study_total:.1f} s vs target {target:.1f} s: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
