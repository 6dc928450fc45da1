"""Progress in the driver's terminal, read back from the job's MLflow run.

Workers write metrics to MLflow; this polls that run once a second, so progress needs no channel
from the workers to the driver and shows exactly what was logged. On a terminal it is a live
bar (step/total, loss, samples/s, ETA); elsewhere (CI, a pipe) a plain line every few seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """Shows a run's progress while it trains, then a summary table.

    Args:
        uri: tracking URI of the run.
        run_id: the MLflow run to follow, or the runs of a study's jobs, followed in order
            (the first that has not ended is the one training).
        enabled: False shows nothing while training (the summary still prints).
        poll_s: seconds between reads of the run.
        labels: what to call each run on the bar (a study's job names).
    """

    def __init__(
        self,
        uri: str,
        run_id: str | list[str],
        enabled: bool = True,
        poll_s: float = 1.0,
        labels: list[str] | None = None,
    ) -> None:
        self.run_ids = [run_id] if isinstance(run_id, str) else list(run_id)
        self.labels = labels or ["train"] * len(self.run_ids)
        self.uri, self.run_id, self.enabled, self.poll_s = uri, self.run_ids[0], enabled, poll_s
        self.console = Console()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _current(self, client: Any) -> tuple[Any, str] | None:
        """The run training now and its label: the first of the runs that has not ended."""
        for run_id, label in zip(self.run_ids, self.labels, strict=True):
            run = client.get_run(run_id)
            if run.info.status == "RUNNING" or run_id == self.run_ids[-1]:
                return run, label
        return None

    def _read(self, client: Any) -> tuple[int, int, dict[str, float], str] | None:
        current = self._current(client)
        if current is None:
            return None
        run, label = current
        total = int(run.data.params.get("plan.total_steps", 0))
        per_epoch = int(run.data.params.get("plan.steps_per_epoch", 0))
        metrics = run.data.metrics
        if not total or "train/epoch" not in metrics:
            return None
        # train/epoch is epoch + fraction done, so it gives the optimizer step without a sync.
        step = min(total, round(metrics["train/epoch"] * per_epoch))
        return step, total, metrics, label

    def _run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        live = self.console.is_terminal
        if not live:  # plain lines every few seconds: no need to read the store every second
            self.poll_s = max(self.poll_s, 5.0)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        last_print = 0.0
        with progress if live else _Nothing():
            # Until rank 0 logs its first step, the bar says the workers are starting.
            task = progress.add_task("starting workers", total=None, loss="-", sps="-")
            while not self._stop.wait(self.poll_s):
                try:
                    read = self._read(client)
                except Exception:  # noqa: BLE001 - the store may be busy; try next time
                    continue
                if read is None:
                    continue
                step, total, metrics, label = read
                loss = f"{metrics.get('train/loss', float('nan')):.4f}"
                sps = f"{metrics.get('perf/samples_per_s', 0.0):,.0f}"
                if live:
                    progress.update(
                        task, description=label, total=total, completed=step, loss=loss, sps=sps
                    )
                elif time.monotonic() - last_print > 5 or step == total:
                    last_print = time.monotonic()
                    where = "" if len(self.run_ids) == 1 else f"{label}: "
                    print(
                        f"[dist-trainer] {where}step {step}/{total}  loss {loss}  {sps} samples/s",
                        flush=True,
                    )

    def summary(
        self,
        metrics: dict[str, float],
        elapsed_s: float,
        comm: Any = None,
        url: str | None = None,
        notes: list[str] | None = None,
    ) -> None:
        """The end-of-job tables (metrics; communication, if measured), `notes` (attempts, what
        the store refused) and how to open the UI."""
        # The latest value of each metric: the last log interval's (perf/*, comm/*, train/*),
        # the last validation's (val/*); the communication summary below is the whole run's.
        table = Table(
            title=f"run {self.run_id}: last logged values (the final log interval)",
            show_header=True,
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            if "/node" in key:  # per-worker telemetry lives in MLflow, not in this table
                continue
            table.add_row(key, f"{metrics[key]:.6g}")
        self.console.print(table)
        if comm is not None:
            from rich.markdown import Markdown

            self.console.print(Markdown(comm.to_markdown()))
        for note in notes or []:
            self.console.print(note, soft_wrap=True, markup=False)
        if self.uri.startswith(("http://", "https://")):
            where = f"Open the UI at {self.uri}"
        else:
            where = f"Open the UI with `make ui` (mlflow ui --backend-store-uri {self.uri})"
        self.console.print(
            f"finished in {elapsed_s:.1f} s. MLflow run id: {self.run_id}\n"
            f"{where} and compare runs side by side in the experiment's table."
        )
        if url:
            self.console.print(f"This run: {url}", soft_wrap=True)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
