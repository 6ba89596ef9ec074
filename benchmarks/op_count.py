"""The operators the host dispatches, counted on any device (benchmarks/eval_launches.py, host_ops.py):
on a GPU each is about one kernel launch, and a step bound by the host waits for them. Views launch
nothing and are not counted."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Non-view operators dispatched while it is active, by name in `counts`; a subclass files each
    one elsewhere too (`record`)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.__name__] += 1
            self.record(func)
        return func(*args, **(kwargs or {}))

    def record(self, func) -> None:
        """Called for every counted operator."""
