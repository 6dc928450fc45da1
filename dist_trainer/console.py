"""What the terminal shows: our lines; Ray's and MLflow's own go to a log file.

A job's terminal should hold the plan, the progress bar, the result table and the links. Ray
and MLflow add ~30 lines of their internals ("Reporting training result 3: TrainingReport(...)",
"Checkpoint successfully created at ...", resource requests, system-metrics notices, the token
authentication notice). Unless `--verbose` is given, those go to `dist_trainer.log` in the
job's output folder (`outputs/<date>/<time>/`, Hydra's run folder), whose path is printed:

* the driver's `ray` logger gets a file handler instead of Ray's console handler;
* MLflow's INFO lines are dropped (`MLFLOW_LOGGING_LEVEL=WARNING`, inherited by local workers);
* the workers' output, which Ray forwards to the driver, is written to the file; only warnings
  and errors of dist_trainer's own loggers in the workers (e.g. "outputs lie in [0, 1] under a
  logits loss") are shown on the terminal too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["VERBOSE_ENV", "log_path", "quiet_libraries", "route_worker_output", "verbose"]

VERBOSE_ENV = "DIST_TRAINER_VERBOSE"
"""Set to 1 (by `dist-trainer --verbose`) to show Ray's and MLflow's lines on the terminal."""

# How dist_trainer's loggers in the workers mark their lines (workers._log_like_the_driver).
_OUR_WORKER_LINES = ("[dist-trainer] WARNING ", "[dist-trainer] ERROR ", "[dist-trainer] CRITICAL ")
_path: Path | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_path() -> Path:
    """This process's log file: in Hydra's run folder when there is one, else the same layout."""
    global _path
    if _path is None:
        folder = None
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                folder = Path(HydraConfig.get().runtime.output_dir)
        except Exception:  # noqa: BLE001 - no Hydra run: use the same layout ourselves
            folder = None
        if folder is None:
            folder = Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
        folder.mkdir(parents=True, exist_ok=True)
        _path = folder / "dist_trainer.log"
    return _path


def _file_handler() -> logging.Handler:
    handler = logging.FileHandler(log_path(), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def quiet_libraries() -> None:
    """Before Ray and MLflow start: their driver-side lines go to the log file."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import ray  # noqa: F401 - configures the "ray" logger, whose handlers are replaced here

    # ray.init drops the "ray" logger's handlers and then warns (token authentication, signal
    # handler): with no handler left, Python's last-resort handler would print them. Its
    # children get the file too, so nothing falls through.
    handler = _file_handler()
    for name in ("ray", "ray._private", "ray.util", "ray.train"):
        ray_logger = logging.getLogger(name)
        ray_logger.handlers = [handler]
        ray_logger.propagate = False
    print(
        f"[dist-trainer] Ray's and the workers' own output: {log_path()} (--verbose shows it here)",
        flush=True,
    )


def route_worker_output() -> None:
    """After `ray.init`: the workers' forwarded output goes to the log file (ours also shows)."""
    if verbose():
        return
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    log_file = log_path().open("a", encoding="utf-8", buffering=1)

    def handle(data: dict[str, Any]) -> None:
        where = f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
        for line in data.get("lines", []):
            log_file.write(f"{where} {line}\n")
            if line.startswith(_OUR_WORKER_LINES):
                print(f"{line} (worker pid {data.get('pid')})", file=sys.stderr, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
