"""Time to first step: a cold `dist-trainer train` against one sent into `dist-trainer cluster up`.

Both launch the same job (the default MLP on breast cancer, 2 CPU workers, `trainer.
log_every_n_steps=1` so the first optimizer step logs `train/loss`). The time to first step is
from just before the `dist-trainer train` process starts to the MLflow timestamp of the run's
first `train/loss` point (taken on rank 0 right after step 1), so it holds everything a user
waits for: imports, config checks, Ray, the worker group, the data, the model and the step.

    cold   dist-trainer train in a folder without a service (DIST_TRAINER_SERVICE=0): its own
           embedded Ray cluster and worker group, as without `cluster up`.
    warm   dist-trainer cluster up (timed on its own, not counted), then the same command from
           that folder, --warm-jobs times in a row: each runs in the warm worker group.

    python scripts/bench_warm.py                  # 1 cold launch, 2 warm launches
    python scripts/bench_warm.py --repeats 3      # 3 cold launches, 3 x 2 warm launches

Targets on a 2-core machine: first step <= 18 s cold, <= 8 s warm. Each launch's output goes
to bench_out/warm_logs/, the numbers to bench_out/warm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("dist-trainer"))
TARGETS = {"cold": 18.0, "warm": 8.0}
JOB = ["trainer.log_every_n_steps=1", "trainer.max_epochs=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(service: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env["DIST_TRAINER_SERVICE"] = "1" if service else "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _first_step(db: Path, run_id: str) -> float:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, "train/loss")
    return min(p.timestamp for p in points) / 1000.0


def _launch(folder: Path, name: str, logs: Path, service: bool) -> dict[str, float | str]:
    db = folder / "mlflow.db"
    log = logs / f"{name}.log"
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.run(
            [CLI, "train", f"tracking.uri=sqlite:///{db}", *JOB],
            cwd=folder,
            env=_env(service),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    ended = time.time()
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    run_id = text.split("MLflow run ", 1)[1].split()[0]
    return {
        "name": name,
        "run_id": run_id,
        "first_step_s": _first_step(db, run_id) - started,
        "exit_s": ended - started,
        "warm_group": "running in the warm worker group" in text,
    }


def _cli(args: list[str], folder: Path, log: Path, timeout: float) -> float:
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.run(
            [CLI, "cluster", *args],
            cwd=folder,
            env=_env(True),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise SystemExit(f"cluster {args[0]} failed (exit {proc.returncode}); see {log}")
    return time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warm-jobs", type=int, default=2, help="warm launches per repeat")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "warm.json"))
    args = parser.parse_args()
    logs = Path(args.out).parent / "warm_logs"
    logs.mkdir(parents=True, exist_ok=True)
    cold, warm, service = [], [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench_cold_") as folder:
            cold.append(_launch(Path(folder), f"cold{repeat}", logs, service=False))
            print(f"cold {repeat}: first step {cold[-1]['first_step_s']:.1f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_warm_") as name:
            folder = Path(name)
            port = _free_port()
            up_s = _cli(["up", "--port", str(port)], folder, logs / f"up{repeat}.log", 300)
            print(f"cluster up: {up_s:.1f} s", flush=True)
            try:
                for job in range(args.warm_jobs):
                    result = _launch(folder, f"warm{repeat}_{job}", logs, service=True)
                    if not result["warm_group"]:
                        raise SystemExit(f"{result['name']} did not run in the warm group")
                    warm.append(result)
                    print(f"warm {repeat}.{job}: first step {result['first_step_s']:.1f} s")
            finally:
                down_s = _cli(["down"], folder, logs / f"down{repeat}.log", 120)
            service.append({"up_s": up_s, "down_s": down_s})
            print(f"cluster down: {down_s:.1f} s", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(float(r[key]) for r in rows)

    summary = {
        "cold_first_step_s": med(cold, "first_step_s"),
        "cold_exit_s": med(cold, "exit_s"),
        "warm_first_step_s": med(warm, "first_step_s"),
        "warm_exit_s": med(warm, "exit_s"),
        "cluster_up_s": med(service, "up_s"),
        "cluster_down_s": med(service, "down_s"),
        "cpus": os.cpu_count(),
    }
    Path(args.out).write_text(
        json.dumps({"summary": summary, "cold": cold, "warm": warm, "service": service}, indent=2)
    )
    print("\nlaunch -> first optimizer step (median; process exit in brackets)")
    for kind in ("cold", "warm"):
        value = summary[f"{kind}_first_step_s"]
        verdict = "ok" if value <= TARGETS[kind] else "MISSED"
        print(
            f"  {kind:<5} {value:5.1f} s  ({summary[f'{kind}_exit_s']:.1f} s)  "
            f"target <= {TARGETS[kind]:.0f} s: {verdict}"
        )
    print(
        f"  cluster up {summary['cluster_up_s']:.1f} s (once), cluster down "
        f"{summary['cluster_down_s']:.1f} s; {len(cold)} cold, {len(warm)} warm launches"
    )
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
