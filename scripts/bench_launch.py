"""Launch time and steady throughput: dist-trainer against plain PyTorch DDP, same invocation.

One fixed workload, `experiment=bench_mlp`: MLP 784-1024-1024-10, synthetic
gaussian data (8192 samples, 10% held out), global batch 256 over 2 workers (gloo, CPU), SGD
lr 0.01 momentum 0.9, float32. Every step is a full global batch (`trainer.drop_last=true`).
Variants, each started as a fresh subprocess:

    plain      scripts/plain_ddp.py: torch.multiprocessing spawn, DDP, no dist_trainer code;
               rank 0 records time.time() after every optimizer step.
    dt         dist-trainer train experiment=bench_mlp (default trainer.log_every_n_steps=10);
               step times are the MLflow timestamps of train/loss (taken on rank 0 right after
               the step whose numbers are logged). The headline.
    dt_log1    the same with trainer.log_every_n_steps=1 (one small all-gather per step).
    dt_off     dt plus comm.enabled=false telemetry.enabled=false tracking.system_metrics=false
               (measurement off: no comm hook, no NVML sampling, no MLflow host metrics).

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
    python scripts/bench_launch.py --retry-noisy 2   # re-run variants that only saw a busy machine
    python scripts/bench_launch.py --variants plain,dt_off,dt_off_hc2   # Ray health check 2 s

Shared machines are noisy: each run also records the CPU other processes took during its steady
window ("other load", from /proc) and the CPU of the run's own processes (the two ranks, and the
rest: Ray daemons, the driver). "quiet /s" is the median over runs with other load <= 0.15 cores;
prefer it (and the ratios marked [quiet runs]) when the plain medians disagree with it.

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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
GLOBAL_BATCH = 256
WORLD = 2
# Measurement off: the comm hook, NVML telemetry and MLflow's host metrics (system/...).
_OFF = ["comm.enabled=false", "telemetry.enabled=false", "tracking.system_metrics=false"]
_HC2 = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}  # Ray's default (dist_trainer sets 1.0)
# name: (description, extra Hydra overrides, extra environment) for the dist-trainer variants.
DT_VARIANTS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "dt": ("dist-trainer (log every 10)", [], {}),
    "dt_log1": ("dist-trainer (log every 1)", ["trainer.log_every_n_steps=1"], {}),
    "dt_off": ("dist-trainer, measurement off", _OFF, {}),
    # Not run by default: for checking a change in the Ray environment.
    "dt_hc2": ("dist-trainer, health check 2 s", [], _HC2),
    "dt_off_hc2": ("dist-trainer, off, health check 2 s", _OFF, _HC2),
}
QUIET_CORES = 0.15  # a run is "quiet" when other processes used at most this in its window
DEFAULT_VARIANTS = ("plain", "dt", "dt_log1", "dt_off")
DESCRIPTIONS = {"plain": "plain PyTorch DDP (mp.spawn)"} | {k: v[0] for k, v in DT_VARIANTS.items()}


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
    n = sum((samples or {}).get(s, GLOBAL_BATCH) for s in range(s0 + 1, s1 + 1))
    return n / (t1 - t0), (s0, s1)


def interval_rates(steps: list[int], times: list[float], window) -> list[float]:
    """Samples/s of each 10-step interval in the window (steps that are multiples of 10).

    Their median shrugs off short bursts of load from other processes, which the window's mean
    rate does not; every variant has a timestamp at every 10th step.
    """
    if not window:
        return []
    grid = [(s, t) for s, t in zip(steps, times, strict=True) if s % 10 == 0]
    grid = [(s, t) for s, t in grid if window[0] <= s <= window[1]]
    return [
        (b - a) * GLOBAL_BATCH / (tb - ta)
        for (a, ta), (b, tb) in zip(grid, grid[1:], strict=False)
        if b - a == 10 and tb > ta
    ]


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _session_members(sid: int) -> list[int]:
    """Processes in session `sid` (the Ray daemons a dist-trainer driver started stay in it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(entry.name)) and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


class CpuSampler:
    """Samples, twice a second, the machine's busy CPU time and that of the run's processes.

    The run is its session (the subprocess and everything it starts, Ray daemons included).
    Over a window this gives the CPU other processes on the machine took meanwhile (in cores:
    the noise that can make one run slower than its neighbour), and the run's CPU by process.
    """

    def __init__(self, sid: int, period_s: float = 0.5) -> None:
        self.sid, self.period_s = sid, period_s
        # (time.time(), machine busy s, {pid: (own u+s s, reaped children u+s s)})
        self.samples: list[tuple[float, float, dict[int, tuple[float, float]]]] = []
        self.names: dict[int, str] = {}
        self._outside: set[str] = set()
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _name(self, pid: int) -> str:
        """The process's name (Ray's process titles), or its script for a plain python."""
        try:
            name = (Path("/proc") / str(pid) / "comm").read_text().strip()
            if name.startswith("python"):
                raw = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
                words = [w.decode(errors="replace") for w in raw[1:] if w]
                script = next((w for w in words if not w.startswith("-")), "")
                if "-c" in words:  # e.g. a multiprocessing spawn child
                    code = words[words.index("-c") + 1] if words[-1] != "-c" else ""
                    name = "python -c " + code.split(";")[-1].strip()
                else:
                    name = Path(script).name or name
        except OSError:
            name = self.names.get(pid, "?")
        return name[:40]

    def _sample(self) -> None:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        machine = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        procs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or entry.name in self._outside:
                continue
            f = _proc_stat(entry.name)
            if f is None or int(f[3]) != self.sid:
                self._outside.add(entry.name)  # not ours: never read again
            else:
                pid = int(entry.name)
                own = (int(f[11]) + int(f[12])) / self._tick
                procs[pid] = (own, (int(f[13]) + int(f[14])) / self._tick)
                self.names[pid] = self._name(pid)
        self.samples.append((time.time(), machine / self._tick, procs))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _ends(self, t0: float, t1: float):
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return (inside[0], inside[-1]) if len(inside) >= 2 else None

    def other_cores(self, t0: float, t1: float) -> float:
        """Mean cores busy outside the run between t0 and t1 (nan if too few samples)."""
        ends = self._ends(t0, t1)
        if ends is None:
            return math.nan
        (a, ma, pa), (b, mb, pb) = ends
        run = sum(map(sum, pb.values())) - sum(map(sum, pa.values()))
        return max(0.0, (mb - ma) - run) / (b - a)

    def by_process(self, t0: float, t1: float) -> list[tuple[str, int, float]]:
        """(name, pid, cores) of the run's processes between t0 and t1, busiest first."""
        ends = self._ends(t0, t1)
        if ends is None:
            return []
        (a, _, pa), (b, _, pb) = ends
        out = [
            (self.names.get(pid, "?"), pid, (own - pa.get(pid, (0.0, 0.0))[0]) / (b - a))
            for pid, (own, _) in pb.items()
        ]
        return sorted(out, key=lambda x: -x[2])


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the session this script started for one run."""
    for pid in _session_members(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float):
    """Run cmd in its own session; return (launch time.time(), exit time.time(), CpuSampler)."""
    with log.open("w") as out:
        launch = time.time()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = CpuSampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        except BaseException:  # Ctrl-C: leave no Ray cluster behind
            sampler.stop()
            _kill_session(proc.pid)
            raise
        exited = time.time()
    # Wait for whatever the run left behind (Ray daemons shutting down) before the next run, so
    # it cannot steal CPU from it; kill stragglers of this session after 20 s.
    deadline = time.monotonic() + 20
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    sampler.stop()
    _kill_session(proc.pid)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); log {log}:\n{tail}")
    return launch, exited, sampler


def _noise(cpu: CpuSampler, launch: float, steps: list, times: list, window) -> dict:
    """Cores other processes kept busy: during launch and during the steady window."""
    steady = math.nan
    if window:
        steady = cpu.other_cores(times[steps.index(window[0])], times[steps.index(window[1])])
    procs = []
    if window:
        t0, t1 = times[steps.index(window[0])], times[steps.index(window[1])]
        procs = [(n, p, round(c, 3)) for n, p, c in cpu.by_process(t0, t1) if c >= 0.005]
    ranks = sum(c for _, _, c in procs[:WORLD])  # the two busiest processes are the ranks
    return {
        "other_cores_launch": cpu.other_cores(launch, times[0]),
        "other_cores_steady": steady,
        "run_cores_ranks_steady": ranks,
        "run_cores_rest_steady": sum(c for _, _, c in procs[WORLD:]),
        "run_processes_steady": procs,
    }


def run_plain(cfg: argparse.Namespace, work: Path, log: Path) -> dict:
    out = work / "plain.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "plain_ddp.py"),
        "--steps", str(cfg.steps), "--num-train", str(cfg.num_train),
        "--num-val", str(cfg.num_val), "--global-batch-size", str(GLOBAL_BATCH),
        "--world-size", str(WORLD), "--threads", str(cfg.threads), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}  # what Ray gives its workers
    launch, exited, cpu = _run(cmd, work, env, log, cfg.timeout)
    data = json.loads(out.read_text())
    times = data["step_end_times"]
    steps = list(range(1, len(times) + 1))
    samples = dict(zip(steps, data["samples_per_step"], strict=True))
    rate, window = steady_rate(steps, times, samples, cfg.steps)
    return {
        "steady_interval_median": _median(interval_rates(steps, times, window)),
        **_noise(cpu, launch, steps, times, window),
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
    return over + DT_VARIANTS[variant][1] + list(cfg.extra)


def run_dt(cfg: argparse.Namespace, work: Path, log: Path, variant: str) -> dict:
    cmd = [str(VENV_BIN / "dist-trainer"), "train", *dt_overrides(cfg, work, variant)]
    env = {**os.environ, **DT_VARIANTS[variant][2]}
    launch, exited, cpu = _run(cmd, work, env, log, cfg.timeout)
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
        "steady_interval_median": _median(interval_rates(steps, times, window)),
        **_noise(cpu, launch, steps, times, window),
        "first_step_s": times[0] - launch,
        "steady_samples_per_s": rate,
        "window": window,
        "steps": steps[-1],
        "last_step_to_exit_s": exited - times[-1],
        "total_s": exited - launch,
        "logged_points": len(steps),
        "run_id": runs[0].info.run_id,
    }


def _plain_json(value):
    """NaN -> None, so the output is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(v) for v in value]
    return value


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def summarize(runs: list[dict], variants: list[str]) -> tuple[dict, dict]:
    """Per-variant medians and the ratios between variants."""
    medians = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        medians[v] = {
            key: _median([r[key] for r in mine])
            for key in (
                "first_step_s", "steady_samples_per_s", "steady_interval_median",
                "last_step_to_exit_s", "total_s",
                "other_cores_launch", "other_cores_steady", "run_cores_ranks_steady",
                "run_cores_rest_steady",
            )
        }  # fmt: skip
        medians[v]["repeats"] = len(mine)
        quiet = [r["steady_samples_per_s"] for r in mine if r["other_cores_steady"] <= QUIET_CORES]
        medians[v]["steady_quiet"] = _median(quiet)
        medians[v]["quiet_repeats"] = len(quiet)
    ratios: dict[str, dict[str, float]] = {}

    def steady(a: str, b: str) -> None:
        if a not in medians or b not in medians:
            return
        ma, mb = medians[a], medians[b]
        row = {
            "all": ma["steady_samples_per_s"] / mb["steady_samples_per_s"],
            "10-step": ma["steady_interval_median"] / mb["steady_interval_median"],
            "quiet": ma["steady_quiet"] / mb["steady_quiet"],
        }
        # Paired per repeat (neighbours in time), then the median of those ratios.
        pairs = []
        for rep in sorted({r["repeat"] for r in runs}):
            ra = [r for r in runs if r["variant"] == a and r["repeat"] == rep]
            rb = [r for r in runs if r["variant"] == b and r["repeat"] == rep]
            if ra and rb:
                pairs.append(ra[0]["steady_samples_per_s"] / rb[0]["steady_samples_per_s"])
        row["paired"] = _median(pairs)
        # The headline: quiet runs when both sides have one, else all runs.
        row["headline"] = row["all"] if math.isnan(row["quiet"]) else row["quiet"]
        ratios[f"steady {a}/{b}"] = row

    for a, b in (
        ("dt", "plain"), ("dt", "dt_off"), ("dt_log1", "plain"), ("dt_off", "plain"),
        ("dt_log1", "dt"), ("dt_hc2", "dt"), ("dt_off_hc2", "dt_off"), ("dt_off_hc2", "plain"),
    ):  # fmt: skip
        steady(a, b)
    for cand in ("dt", "dt_off"):
        if cand in medians and "plain" in medians:
            a, b = medians[cand]["first_step_s"], medians["plain"]["first_step_s"]
            ratios[f"first step {cand}/plain"] = {"ratio": a / b, "difference_s": a - b}
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
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma list out of {','.join(DESCRIPTIONS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=ray_worker_threads(),
        help="torch threads per baseline rank (default: what Ray gives a 1-CPU worker)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-epoch-work", action="store_true",
        help="keep dist-trainer's per-epoch validation and checkpoint inside the window",
    )  # fmt: skip
    parser.add_argument(
        "--retry-noisy", type=int, default=0, metavar="N",
        help="up to N extra rounds re-running variants that have no quiet run yet "
        f"(other processes above {QUIET_CORES} cores in the steady window)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "launch.json")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for dist-trainer (after --)")
    cfg = parser.parse_args()
    cfg.repeats = cfg.repeats or (1 if cfg.quick else 2)
    cfg.epochs = cfg.epochs or (3 if cfg.quick else 11)
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    unknown = set(variants) - set(DESCRIPTIONS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(DESCRIPTIONS)}")
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
    runs: list[dict] = []

    def run_one(variant: str, rep: int) -> None:
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
            f"exit {result['total_s']:6.1f} s  other load {result['other_cores_launch']:.2f}"
            f"/{result['other_cores_steady']:.2f} cores  run: ranks "
            f"{result['run_cores_ranks_steady']:.2f} + rest "
            f"{result['run_cores_rest_steady']:.2f} cores{extra}",
            flush=True,
        )

    for rep in range(cfg.repeats):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            run_one(variant, rep)
    for extra_round in range(cfg.retry_noisy):
        noisy = [
            v
            for v in variants
            if not any(r["variant"] == v and r["other_cores_steady"] <= QUIET_CORES for r in runs)
        ]
        if not noisy:
            break
        print(f"  no quiet run yet for {', '.join(noisy)}: running again", flush=True)
        for variant in noisy:
            run_one(variant, cfg.repeats + extra_round)
    medians, ratios = summarize(runs, variants)
    print(f"\nmedians over {cfg.repeats} repeat(s), {cfg.steps} steps each:")
    header = (
        f"{'variant':34s} {'first step s':>12s} {'steady /s':>10s} {'10-step /s':>10s} "
        f"{'quiet /s':>12s} {'exit s':>7s}"
    )
    print(header + f" {'last step->exit s':>17s} {'other load':>11s} {'run rest':>8s}")
    for v in variants:
        m = medians[v]
        print(
            f"{DESCRIPTIONS[v]:34s} {m['first_step_s']:12.2f} {m['steady_samples_per_s']:10.0f} "
            f"{m['steady_interval_median']:10.0f} "
            f"{m['steady_quiet']:7.0f} ({m['quiet_repeats']}) {m['total_s']:7.1f} "
            f"{m['last_step_to_exit_s']:17.2f} "
            f"{m['other_cores_launch']:5.2f}/{m['other_cores_steady']:4.2f} "
            f"{m['run_cores_rest_steady']:8.2f}"
        )
    print(
        "steady /s: mean rate over the window; 10-step /s: median of its 10-step intervals; "
        f"quiet /s: median over the (n) runs with other load <= {QUIET_CORES} cores.\n"
        "other load: cores busy outside the run (other processes on the machine) during "
        "launch/steady window; with 2 cores anything above ~0.1 disturbs the figures.\n"
        "run rest: cores the run's own processes other than its 2 busiest (the ranks) used in "
        "the steady window (Ray daemons, driver, ...)"
    )
    for v in variants:
        last = [r for r in runs if r["variant"] == v][-1]
        top = ", ".join(f"{n} {c:.2f}" for n, _, c in last["run_processes_steady"][:8])
        print(f"  {v}: busiest processes in the steady window (cores): {top}")
    print(
        "\nratios of steady samples/s: headline = quiet runs when both sides have one, else all "
        "runs;\n  all = medians of all runs, 10-step = of 10-step interval medians, paired = "
        "median of per-repeat ratios"
    )
    print(f"  {'':22s} {'headline':>9s} {'all':>7s} {'10-step':>8s} {'paired':>7s} {'quiet':>7s}")
    targets = {"steady dt/plain": 0.98, "steady dt/dt_off": 0.98}
    for key, row in ratios.items():
        if key.startswith("steady"):
            target = f"   target >= {targets[key]}" if key in targets else ""
            cols = " ".join(
                f"{row[c]:{w}.3f}" for c, w in (("all", 7), ("10-step", 8), ("paired", 7))
            )
            print(f"  {key:22s} {row['headline']:9.3f} {cols} {row['quiet']:7.3f}{target}")
    for key, row in ratios.items():
        if key.startswith("first step"):
            print(
                f"  {key:22s} {row['ratio']:9.2f}x  ({row['difference_s']:+.1f} s; medians of "
                "launch -> end of first optimizer step)"
            )
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(
        json.dumps(
            _plain_json({
                "config": {
                    "steps": cfg.steps, "epochs": cfg.epochs, "num_samples": cfg.num_samples,
                    "num_train": cfg.num_train, "global_batch_size": GLOBAL_BATCH,
                    "world_size": WORLD, "repeats": cfg.repeats, "threads": cfg.threads,
                    "keep_epoch_work": cfg.keep_epoch_work, "extra": cfg.extra,
                    "quick": cfg.quick, "retry_noisy": cfg.retry_noisy,
                },
                "runs": runs,
                "medians": medians,
                "ratios": ratios,
            }),
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    print(f"\nwrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
