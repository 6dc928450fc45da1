"""Launch time and steady throughput: dist-trainer against plain PyTorch DDP, same invocation.

One fixed workload, `experiment=bench_mlp` (REFERENCE.md): MLP 784-1024-1024-10, synthetic
gaussian data (8192 samples, 10% held out), global batch 256 over 2 workers (gloo, CPU), SGD
lr 0.01 momentum 0.9, float32. Every step is a full global batch (`trainer.drop_last=true`).
Variants, each started as a fresh subprocess:

    plain      scripts/plain_ddp.py: torch.multiprocessing spawn, DDP, no dist_trainer code;
               rank 0 records time.time() after every optimizer step.
    dt         dist-trainer train experiment=bench_mlp (default trainer.log_every_n_steps=10);
               step times are the MLflow timestamps of train/loss (taken on rank 0 right after
               the step whose numbers are logged). The headline.
    dt_log1    the same with trainer.log_every_n_steps=1 (one small all-gather per step).
    dt_off     dt plus comm.enabled=false telemetry.enabled=false (measurement off).

For each: launch -> end of the first optimizer step (from subprocess start, imports included),
steady samples/s after a warm-up (skip max(20, 10% of steps) steps; rate = steps between the
first and last kept timestamp x 256 / elapsed), and launch -> process exit. Runs alternate their
order every repeat (plain, dt, dt_log1, dt_off, then reversed) to spread machine noise; the
table shows medians and the ratios dt/plain (steady, target >= 0.98), dt/dt_off (measurement
on vs off, target >= 0.98) and first-step times.

Thread count: Ray 2.60 sets OMP_NUM_THREADS=floor(CPUs of the worker) (1 here: 1 CPU per worker)
for its workers when it is unset, so torch.get_num_threads() == 1 in dist-trainer's workers. The
baseline gets the same (`--threads`, default: what Ray would pick); with 2 threads per rank on
2 cores the baseline is over 10x slower, so this matters.

Per-epoch validation and checkpoints are pushed out of the measured window (val and checkpoint
once, at the end) so that both sides measure training steps; `--keep-epoch-work` keeps
dist-trainer's per-epoch validation + checkpoint (what bench_mlp does by default) to show their
cost.

    make bench                                   # python scripts/bench_launch.py
    python scripts/bench_launch.py --repeats 3   # more repeats
    python scripts/bench_launch.py --quick       # smoke run: 3 epochs (84 steps), 1 repeat
    python scripts/bench_launch.py --variants plain,dt

Writes everything (per run, medians, ratios) to --out (default bench_out/launch.json) and each
run's output to bench_out/launch_logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
GLOBAL_BATCH = 256
WORLD = 2
VARIANTS = ("plain", "dt", "dt_log1", "dt_off")
DESCRIPTIONS = {
    "plain": "plain PyTorch DDP (mp.spawn)",
    "dt": "dist-trainer (log every 10)",
    "dt_log1": "dist-trainer (log every 1)",
    "dt_off": "dist-trainer, comm+telemetry off",
}


def ray_worker_threads(cpus_per_worker: float = 1.0) -> int:
    """torch intra-op threads in a Ray worker: Ray's set_omp_num_threads_if_unset rule."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        return int(env)
    return max(math.floor(cpus_per_worker), 1)


def split_sizes(num_samples: int, val_fraction: float = 0.1) -> tuple[int, int]:
    """(train, val) sizes as dist_trainer.data.synthetic cuts them."""
    n_val = round(num_samples * val_fraction)
    return num_samples - n_val, n_val


def steady_rate(steps: list[int], times: list[float], samples: dict[int, int] | None, total: int):
    """Samples/s between the first kept and last timestamp, after the warm-up; and the window."""
    skip = max(20, math.ceil(0.1 * total))
    kept = [(s, t) for s, t in zip(steps, times, strict=True) if s >= skip]
    if len(kept) < 2:
        return math.nan, None
    (s0, t0), (s1, t1) = kept[0], kept[-1]
    n = (
        sum(samples.get(s, GLOBAL_BATCH) for s in range(s0 + 1, s1 + 1))
        if samples
        else ((s1 - s0) * GLOBAL_BATCH)
    )
    return n / (t1 - t0), (s0, s1)


def _session_members(sid: int) -> list[int]:
    """Processes in session `sid` (the Ray daemons a dist-trainer driver started stay in it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float):
    """Run cmd in its own session; return (launch time.time(), exit time.time())."""
    with log.open("w") as out:
        launch = time.time()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        exited = time.time()
    # Wait for whatever the run left behind (Ray daemons shutting down) before the next run, so
    # it cannot steal CPU from it; kill stragglers of this session after 20 s.
    deadline = time.monotonic() + 20
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_members(proc.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); log {log}:\n{tail}")
    return launch, exited


def run_plain(cfg: argparse.Namespace, work: Path, log: Path) -> dict:
    out = work / "plain.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "plain_ddp.py"),
        "--steps", str(cfg.steps), "--num-train", str(cfg.num_train),
        "--num-val", str(cfg.num_val), "--global-batch-size", str(GLOBAL_BATCH),
        "--world-size", str(WORLD), "--threads", str(cfg.threads), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}  # what Ray gives its workers
    launch, exited = _run(cmd, work, env, log, cfg.timeout)
    data = json.loads(out.read_text())
    times = data["step_end_times"]
    steps = list(range(1, len(times) + 1))
    samples = dict(zip(steps, data["samples_per_step"], strict=True))
    rate, window = steady_rate(steps, times, samples, cfg.steps)
    return {
        "first_step_s": times[0] - launch,
        "steady_samples_per_s": rate,
        "window": window,
        "steps": len(times),
        "last_step_to_exit_s": exited - times[-1],
        "total_s": exited - launch,
        "torch_num_threads": data["torch_num_threads"],
    }


def dt_overrides(cfg: argparse.Namespace, work: Path, variant: str) -> list[str]:
    over = [
        "experiment=bench_mlp",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"scaling.storage_path={work}/ray",
        f"scaling.num_workers={WORLD}",
        f"data.num_samples={cfg.num_samples}",
        f"trainer.global_batch_size={GLOBAL_BATCH}",
        f"trainer.max_epochs={cfg.epochs}",
        "trainer.drop_last=true",
    ]
    if not cfg.keep_epoch_work:  # validate and checkpoint once, after the last step
        over += [
            f"trainer.val_every_n_epochs={cfg.epochs + 1}",
            f"trainer.checkpoint_every_n_steps={cfg.steps + 1}",
        ]
    if variant == "dt_log1":
        over.append("trainer.log_every_n_steps=1")
    if variant == "dt_off":
        over += ["comm.enabled=false", "telemetry.enabled=false"]
    return over + list(cfg.extra)


def run_dt(cfg: argparse.Namespace, work: Path, log: Path, variant: str) -> dict:
    cmd = [str(VENV_BIN / "dist-trainer"), "train", *dt_overrides(cfg, work, variant)]
    launch, exited = _run(cmd, work, dict(os.environ), log, cfg.timeout)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("bench")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run in experiment 'bench', found {len(runs)}")
    history = sorted(
        client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step
    )
    steps = [m.step for m in history]
    times = [m.timestamp / 1000.0 for m in history]
    if not steps or steps[0] != 1 or steps[-1] != cfg.steps:
        raise RuntimeError(f"{variant}: train/loss logged at steps {steps[:3]}..{steps[-1:]}")
    rate, window = steady_rate(steps, times, None, cfg.steps)
    return {
        "first_step_s": times[0] - launch,
        "steady_samples_per_s": rate,
        "window": window,
        "steps": steps[-1],
        "last_step_to_exit_s": exited - times[-1],
        "total_s": exited - launch,
        "logged_points": len(steps),
        "run_id": runs[0].info.run_id,
    }


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def summarize(runs: list[dict], variants: list[str]) -> tuple[dict, dict]:
    medians = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        medians[v] = {
            key: _median([r[key] for r in mine])
            for key in ("first_step_s", "steady_samples_per_s", "last_step_to_exit_s", "total_s")
        }
        medians[v]["repeats"] = len(mine)
    ratios: dict[str, float] = {}

    def steady(a: str, b: str) -> None:
        if a in medians and b in medians:
            ratios[f"steady {a}/{b}"] = (
                medians[a]["steady_samples_per_s"] / medians[b]["steady_samples_per_s"]
            )
            # Paired per repeat (same neighbourhood in time), then the median of those.
            pairs = []
            for rep in sorted({r["repeat"] for r in runs}):
                ra = [r for r in runs if r["variant"] == a and r["repeat"] == rep]
                rb = [r for r in runs if r["variant"] == b and r["repeat"] == rep]
                if ra and rb:
                    pairs.append(ra[0]["steady_samples_per_s"] / rb[0]["steady_samples_per_s"])
            ratios[f"steady {a}/{b} (median of paired repeats)"] = _median(pairs)

    steady("dt", "plain")
    steady("dt_log1", "plain")
    steady("dt", "dt_off")
    steady("dt_log1", "dt")
    for cand in ("dt", "dt_off"):
        if cand in medians and "plain" in medians:
            a, b = medians[cand]["first_step_s"], medians["plain"]["first_step_s"]
            ratios[f"first step {cand}/plain"] = a / b
            ratios[f"first step {cand}-plain (s)"] = a - b
    return medians, ratios


def main() -> int:
    parser = argparse.ArgumentParser(
        description="dist-trainer vs plain PyTorch DDP: launch time and steady throughput",
        epilog="Extra arguments after -- are Hydra overrides for the dist-trainer variants.",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 11: 308 steps)")
    parser.add_argument("--num-samples", type=int, default=8192, help="data.num_samples")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 epochs, 1 repeat")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list out of {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--threads", type=int, default=ray_worker_threads(),
        help="torch threads per baseline rank (default: what Ray gives a 1-CPU worker)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-epoch-work", action="store_true",
        help="keep dist-trainer's per-epoch validation and checkpoint inside the window",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "launch.json")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for dist-trainer (after --)")
    cfg = parser.parse_args()
    cfg.repeats = cfg.repeats or (1 if cfg.quick else 2)
    cfg.epochs = cfg.epochs or (3 if cfg.quick else 11)
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    cfg.num_train, cfg.num_val = split_sizes(cfg.num_samples)
    steps_per_epoch = cfg.num_train // GLOBAL_BATCH
    if steps_per_epoch < 1:
        parser.error("--num-samples leaves less than one global batch of training data")
    cfg.steps = steps_per_epoch * cfg.epochs
    logs = cfg.out.parent / "launch_logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"workload: MLP 784-1024-1024-10, {cfg.num_train} train samples, global batch "
        f"{GLOBAL_BATCH} over {WORLD} ranks, {cfg.steps} steps ({cfg.epochs} epochs); "
        f"baseline torch threads/rank = {cfg.threads} (Ray: OMP_NUM_THREADS=1 per 1-CPU worker)",
        flush=True,
    )
    runs = []
    for rep in range(cfg.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for variant in order:
            with tempfile.TemporaryDirectory(prefix=f"bench_{variant}_") as tmp:
                work = Path(tmp)
                log = logs / f"{variant}_{rep}.log"
                if variant == "plain":
                    result = run_plain(cfg, work, log)
                else:
                    result = run_dt(cfg, work, log, variant)
            result.update(variant=variant, repeat=rep)
            runs.append(result)
            extra = f"  threads={result['torch_num_threads']}" if variant == "plain" else ""
            print(
                f"  [{rep}] {variant:8s} first step {result['first_step_s']:6.2f} s  "
                f"steady {result['steady_samples_per_s']:7.0f} samples/s  "
                f"exit {result['total_s']:6.1f} s{extra}",
                flush=True,
            )
    medians, ratios = summarize(runs, variants)
    print(f"\nmedians over {cfg.repeats} repeat(s), {cfg.steps} steps each:")
    header = f"{'variant':36s} {'first step s':>12s} {'steady samples/s':>17s} {'exit s':>8s}"
    print(header + f" {'last step->exit s':>18s}")
    for v in variants:
        m = medians[v]
        print(
            f"{DESCRIPTIONS[v]:36s} {m['first_step_s']:12.2f} {m['steady_samples_per_s']:17.0f} "
            f"{m['total_s']:8.1f} {m['last_step_to_exit_s']:18.2f}"
        )
    print("\nratios:")
    targets = {"steady dt/plain": 0.98, "steady dt/dt_off": 0.98}
    for key, value in ratios.items():
        target = f"   (target >= {targets[key]})" if key in targets else ""
        print(f"  {key:48s} {value:8.3f}{target}")
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(
        json.dumps(
            {
                "config": {
                    "steps": cfg.steps, "epochs": cfg.epochs, "num_samples": cfg.num_samples,
                    "num_train": cfg.num_train, "global_batch_size": GLOBAL_BATCH,
                    "world_size": WORLD, "repeats": cfg.repeats, "threads": cfg.threads,
                    "keep_epoch_work": cfg.keep_epoch_work, "extra": cfg.extra,
                    "quick": cfg.quick,
                },
                "runs": runs,
                "medians": medians,
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    print(f"\nwrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
