"""`dist-trainer <verb>`: the command line.

    dist-trainer train [hydra overrides]        one job (--cfg job prints its config)
    dist-trainer train -m key=a,b,c ...         a study: parent run, one child per job
    dist-trainer bench-comm [hydra overrides]   all-reduce sweep on the training worker set-up
    dist-trainer report --experiment NAME       plots and findings of a study, from MLflow
    dist-trainer cluster up|status|down         a local Ray head + warm worker group for train
    dist-trainer resume RUN_ID                  a new driver for a job whose driver died

Each verb is a Hydra app over conf/, so overrides, `-m` sweeps and `--cfg job` work the same
everywhere. `train(cfg)` itself lives in dist_trainer.driver; this module only parses and
reports errors the way a user should see them: one line naming the key and the fix.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import hydra
from omegaconf import DictConfig

from dist_trainer.config import CONF_DIR as _CONF_PATH
from dist_trainer.config import ConfigError, open_target_overrides, register_configs
from dist_trainer.console import VERBOSE_ENV

__all__ = ["main"]

CONF_DIR = str(_CONF_PATH)

_USAGE = """usage: dist-trainer <verb> [--verbose] [hydra overrides]

verbs:
  train        run a training job (Ray Train DDP workers, one MLflow run); with -m, a study:
               one parent run, a child run per job, jobs sharing one worker group
  bench-comm   measure all-reduce time and bandwidth over message sizes
  report       plots and findings of a study, read back from MLflow (report --help)
  cluster      up|status|down: a local Ray head and a warm worker group that `train` jobs from
               this folder run in, one after another (cluster --help)
  submit       run a job on a Ray cluster through its job server (submit --help)
  resume RUN_ID  continue a job whose driver died, from its latest checkpoint, in its run
  import-metrics FILE: write what a job could not send to MLflow (outputs/unsent_metrics/)

--verbose shows Ray's and MLflow's own lines too (otherwise in the log file it names).

examples:
  dist-trainer train
  dist-trainer train model=cnn data=digits trainer.global_batch_size=128
  dist-trainer train -m trainer.global_batch_size=32,128
  dist-trainer train --cfg job
"""


@contextlib.contextmanager
def _config_errors_as_exit() -> Iterator[None]:
    """A ConfigError is the user's to fix: one line naming the key, exit code 2, no traceback.

    Raised inside the Hydra app, because Hydra wraps any Exception in its own report.
    """
    try:
        yield
    except ConfigError as exc:
        print(f"dist-trainer: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _train_app(cfg: DictConfig) -> float | None:
    from dist_trainer.driver import train

    with _config_errors_as_exit():
        result = train(cfg)
    # Returned to Hydra so sweepers (e.g. Optuna) can optimize it.
    return result.metrics.get("val/loss")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _bench_comm_app(cfg: DictConfig) -> None:
    from dist_trainer.bench_comm import run_bench_comm

    with _config_errors_as_exit():
        run_bench_comm(cfg)


_VERBS = {"train": _train_app, "bench-comm": _bench_comm_app}
_MULTIRUN_FLAGS = ("-m", "--multirun")


def _is_study(args: list[str]) -> bool:
    """`train -m` is a study, unless another Hydra sweeper or launcher is asked for (then Hydra
    runs the jobs one by one, each its own launch)."""
    custom = any(a.startswith(("hydra/sweeper=", "hydra/launcher=")) for a in args)
    return any(a in _MULTIRUN_FLAGS for a in args) and not custom


def _study(overrides: list[str]) -> int:
    from dist_trainer.study import run_study

    with _config_errors_as_exit():
        result = run_study(overrides)
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    verb, rest = args[0], [a for a in args[1:] if a not in ("-v", "--verbose")]
    if len(rest) < len(args) - 1:  # Ray's and MLflow's own lines on the terminal too
        os.environ[VERBOSE_ENV] = "1"
    if verb == "report":
        from dist_trainer.study_report import main as report_main

        return report_main(rest)
    if verb == "cluster":
        from dist_trainer.cluster import main as cluster_main

        return cluster_main(rest)
    if verb == "submit":
        from dist_trainer.submit import main as submit_main

        register_configs()
        return submit_main(rest)
    if verb == "resume":
        from dist_trainer.resume import main as resume_main

        return resume_main(rest)
    if verb == "import-metrics":
        from dist_trainer.run_logger import import_metrics_main

        return import_metrics_main(rest)
    if verb not in _VERBS:
        print(f"dist-trainer: unknown verb {verb!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    register_configs()
    if verb == "train" and _is_study(rest):
        return _study([a for a in rest if a not in _MULTIRUN_FLAGS])
    with _config_errors_as_exit():
        rest = open_target_overrides(rest)
    sys.argv = [f"dist-trainer {verb}", *rest]  # Hydra reads sys.argv
    _VERBS[verb]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
