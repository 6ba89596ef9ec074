"""Benchmarks of the training step, the data loader and evaluation (BENCHMARKS.md has the results)."""
import json
import os
from pathlib import Path


def save_result(result: dict, output: Path) -> None:
    """Write a benchmark's JSON to `output`, and a copy under $OUT where the device runner collects
    files (benchmarks/gpu_session.sh)."""
    text = json.dumps(result, indent=1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], output.name).write_text(text)
