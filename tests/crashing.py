"""A model that fails once mid-training, to test restart and resume through Ray Train."""

from __future__ import annotations

import os

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
