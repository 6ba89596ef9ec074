"""Boxes that make NMS work hard, for the tests of its GPU forms (tests/test_sync_free.py and the
interpreter checks of tests/support/nms_scan_checks.py)."""
from __future__ import annotations

import torch


def crowded_boxes(n: int, generator: torch.Generator, span: float = 200.0) -> torch.Tensor:
    """Boxes jittered around a few centres: heavy overlaps, long suppression chains."""
    centres = torch.rand(6, 2, generator=generator) * span
    pick = torch.randint(0, 6, (n,), generator=generator)
    xy = centres[pick] + torch.randn(n, 2, generator=generator) * 6
    wh = 20 + torch.rand(n, 2, generator=generator) * 30
    return torch.cat([xy, xy + wh], dim=1)
