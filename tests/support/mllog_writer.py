"""Write small MLPerf Training logs (:::MLLOG lines) for the scoring tests.

They carry every key the real compliance checker requires for closed-division maskrcnn (ruleset
3.1.0), so a log written with defaults passes it; `break_rule` makes one it rejects.
"""
from __future__ import annotations

import json
from pathlib import Path

T0 = 1_700_000_000_000  # an arbitrary epoch in ms; what matters is run_stop - run_start


def _line(key, value=None, t=0, event="POINT_IN_TIME", **metadata) -> str:
    rec = {"namespace": "", "time_ms": T0 + int(t), "event_type": event, "key": key, "value": value,
           "metadata": {"file": "synthetic.py", "lineno": 1, **metadata}}
    return ":::MLLOG " + json.dumps(rec)


def write_log(path: Path, *, minutes: float, status: str = "success", epochs: int = 4,
              final=(0.38, 0.345), division: str = "closed", targets: dict | None = None,
              break_rule: bool = False, seed: int = 1, benchmark: str = "maskrcnn", batch: int = 16,
              v07: bool = False, org: str = "tests") -> Path:
    """A run of `epochs` epochs taking `minutes` from run_start to run_stop, accuracy rising to `final`.

    break_rule: log global_batch_size twice, which the checker's EXACTLY_ONE rule rejects.
    targets: log them as a `quality_target` record, as an open-division run states its own.
    v07: without gradient_accumulation_steps, as MLPerf v0.7 logs are (rulesets from 1.0.0 want it).
    """
    ms = minutes * 60000
    start = 60_000
    lines = [
        _line("submission_benchmark", benchmark), _line("submission_org", org),
        _line("submission_division", division), _line("submission_status", "research"),
        _line("submission_platform", "1xCPU"), _line("cache_clear", True),
        _line("init_start", t=1000, event="INTERVAL_START"),
        _line("seed", seed, t=1001), _line("global_batch_size", batch, t=1002),
        *([] if v07 else [_line("gradient_accumulation_steps", 1, t=1003)]),
        _line("opt_base_learning_rate", 0.02 * batch / 16, t=1004),
        _line("opt_learning_rate_warmup_steps", 500, t=1005),
        _line("opt_learning_rate_warmup_factor", 0.333, t=1006),
        _line("num_image_candidates", 1000, t=1007), _line("opt_learning_rate_decay_factor", 0.1, t=1008),
        _line("opt_learning_rate_decay_steps", [60000, 80000], t=1009),
        _line("min_image_size", 800, t=1010), _line("max_image_size", 1333, t=1011),
        _line("train_samples", 117266, t=1012), _line("eval_samples", 5000, t=1013),
    ]
    if targets:
        lines.append(_line("quality_target", targets, t=1014))
    if break_rule:
        lines.append(_line("global_batch_size", 32, t=1015))
    lines += [_line("init_stop", t=2000, event="INTERVAL_END"),
              _line("run_start", t=start, event="INTERVAL_START")]
    step = ms / epochs
    for e in range(1, epochs + 1):
        t = start + step * (e - 1)
        frac = e / epochs
        lines += [
            _line("block_start", t=t + 1, event="INTERVAL_START", first_epoch_num=e, epoch_count=1),
            _line("epoch_start", t=t + 2, event="INTERVAL_START", epoch_num=e),
            _line("epoch_stop", t=t + step * 0.8, event="INTERVAL_END", epoch_num=e),
            _line("block_stop", t=t + step * 0.8 + 1, event="INTERVAL_END", first_epoch_num=e),
            _line("eval_start", t=t + step * 0.8 + 2, event="INTERVAL_START", epoch_num=e),
            _line("eval_accuracy", {"BBOX": round(final[0] * frac, 4), "SEGM": round(final[1] * frac, 4)},
                  t=t + step - 3, epoch_num=e),
            _line("eval_stop", t=t + step - 2, event="INTERVAL_END", epoch_num=e),
        ]
    lines.append(_line("run_stop", t=start + ms, event="INTERVAL_END", status=status))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
