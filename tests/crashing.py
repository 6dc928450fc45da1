"""Models that fail once mid-training, to test restart and resume through Ray Train."""

from __future__ import annotations

import os
import signal
import time

from dist_trainer.models import MLP


class CrashOnceMLP(MLP):
    """An MLP whose forward raises at call `crash_at_call` if `marker` does not exist yet."""

    def __init__(self, marker: str, crash_at_call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        self.crash_at_call = crash_at_call
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == self.crash_at_call and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write("crashed once")
            raise RuntimeError("injected failure (tests.crashing)")
        return super().forward(x)


class FailsAtMicroBatch(MLP):
    """An MLP whose training forward raises on micro-batches of `micro_batch` samples: in a
    study over global batch sizes, exactly one job fails, and only inside the workers (the
    driver's meta-device check passes: meta tensors are let through)."""

    def __init__(self, micro_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.micro_batch = micro_batch

    def forward(self, x):
        if self.training and not x.is_meta and x.shape[0] == self.micro_batch:
            raise RuntimeError(f"injected failure at micro-batch {self.micro_batch}")
        return super().forward(x)


class DiesOnceMLP(MLP):
    """An MLP whose worker process dies hard (SIGKILL: no exception, no cleanup, like an
    out-of-memory kill) at its training forward call `die_at_call` on rank `rank`, if `marker`
    does not exist yet. It first waits `delay_s`, so the other ranks' loggers flush what they
    logged: the store then holds steps the resumed job replays. Meta tensors (the driver's
    preflight) pass through and are not counted."""

    def __init__(
        self, marker: str, die_at_call: int, rank: int = 1, delay_s: float = 0.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        self.die_at_call = die_at_call
        self.rank = rank
        self.delay_s = delay_s
        self.calls = 0

    def forward(self, x):
        if self.training and not x.is_meta:
            self.calls += 1
            dies = self.calls == self.die_at_call and self._my_rank() == self.rank
            if dies and not os.path.exists(self.marker):
                with open(self.marker, "w") as f:
                    f.write(f"killed rank {self.rank} at training forward {self.calls}")
                time.sleep(self.delay_s)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)

    @staticmethod
    def _my_rank() -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SlowAloneMLP(MLP):
    """An MLP whose training forward sleeps `delay_s` while it trains alone (world size 1), so
    an elastic job started on one worker runs long enough for Ray Train to notice a node added
    meanwhile and grow the group; once resized it runs at full speed."""

    def __init__(self, delay_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def forward(self, x):
        if self.training and not x.is_meta and self.delay_s and DiesOnceMLP._my_rank() == 0:
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_world_size() == 1:
                time.sleep(self.delay_s)
        return super().forward(x)


class SlowMLP(MLP):
    """An MLP whose training forward sleeps `delay_s` on every rank: a job long enough to kill
    its driver mid-run."""

    def __init__(self, delay_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def forward(self, x):
        if self.training and not x.is_meta and self.delay_s:
            time.sleep(self.delay_s)
        return super().forward(x)


class BlocksOnceMLP(MLP):
    """An MLP whose worker stops at its `at_step`-th training micro-batch on rank `rank`, if
    `marker` does not exist yet: it writes its pid to `marker` and waits there to be killed
    from outside (tests/test_kills.py's killer sends SIGKILL). Micro-batches are counted by
    their input tensor, so the exposed-comm probe's extra micro-step on the same batch does
    not count; with no accumulation the count is the optimizer step. With `micro_batch`, only
    micro-batches of that many samples count (one job of a study). Meta tensors (the driver's
    preflight) pass through."""

    def __init__(
        self, marker: str, at_step: int, rank: int = 1, micro_batch: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        self.at_step = at_step
        self.rank = rank
        self.micro_batch = micro_batch
        self.micro_batches = 0
        self._last_input = None

    def forward(self, x):
        counted = not self.micro_batch or x.shape[0] == self.micro_batch
        if self.training and not x.is_meta and counted and x is not self._last_input:
            self._last_input = x
            self.micro_batches += 1
            here = self.micro_batches == self.at_step and DiesOnceMLP._my_rank() == self.rank
            if here and not os.path.exists(self.marker):
                partial = f"{self.marker}.partial"
                with open(partial, "w") as f:
                    f.write(str(os.getpid()))
                os.replace(partial, self.marker)  # the killer never reads half a pid
                time.sleep(300)
                raise RuntimeError("tests.crashing.BlocksOnceMLP was never killed")
        return super().forward(x)
