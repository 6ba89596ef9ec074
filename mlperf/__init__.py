"""Automation library behind tasks.py: datasets, fetch, verify, image, launch, results, remote.

Nothing here imports torch at module level, so `invoke --list` and the dataset steps stay fast and
work on machines without it.
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
