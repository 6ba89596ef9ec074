"""The run's MLPerf log (mlperf_logging.mllog): written by rank 0 only, to the result file (and to
stdout with `echo`: --verbose, or MLPERF_LOG_ECHO=1).

`MLLogger` holds the calls the loop makes (event, start, end) and the fixed records of a run: the
submission, the recipe's hyperparameters, and the two records the compliance checker ignores but
`invoke time` reads (the quality targets, the configuration name and the model).
"""
from __future__ import annotations

import logging
from pathlib import Path

from mlperf_logging import mllog
from mlperf_logging.mllog import constants as C

from object_detection.recipe import BENCHMARK, Profile, Schedule

PACKAGE_DIR = Path(__file__).resolve().parent   # log records name the trainer's files relative to it


class MLLogger:
    """mllog for rank 0 (`enabled`); every other rank's calls do nothing."""

    def __init__(self, path: Path, enabled: bool, echo: bool = False):
        self.enabled = enabled
        self._logger = mllog.get_mllogger()
        if enabled:
            if not echo:  # mllog's default logger prints every record to stdout: the file holds them
                for handler in list(self._logger.logger.handlers):
                    if type(handler) is logging.StreamHandler:
                        self._logger.logger.removeHandler(handler)
            # stack offset 2: the record names the caller of these methods, not this file
            mllog.config(filename=str(path), root_dir=str(PACKAGE_DIR), default_stack_offset=2)
        else:
            self._logger.logger.setLevel("ERROR")

    def event(self, key: str, value=None, **metadata) -> None:
        if self.enabled:
            self._logger.event(key=key, value=value, metadata=metadata or None)

    def start(self, key: str, **metadata) -> None:
        if self.enabled:
            self._logger.start(key=key, metadata=metadata or None)

    def end(self, key: str, value=None, **metadata) -> None:
        if self.enabled:
            self._logger.end(key=key, value=value, metadata=metadata or None)

    def submission(self, *, org: str, division: str, status: str, platform: str) -> None:
        self.event(C.SUBMISSION_BENCHMARK, BENCHMARK)
        self.event(C.SUBMISSION_ORG, org)
        self.event(C.SUBMISSION_DIVISION, division)
        self.event(C.SUBMISSION_STATUS, status)
        self.event(C.SUBMISSION_PLATFORM, platform)

    def hyperparameters(self, *, seed: int, global_batch: int, per_gpu_batch: int, schedule: Schedule,
                        profile: Profile, targets: dict[str, float], config_name: str) -> None:
        self.event(C.SEED, seed)
        self.event(C.GLOBAL_BATCH_SIZE, global_batch)
        self.event(C.GRADIENT_ACCUMULATION_STEPS, 1)
        self.event(C.NUM_IMAGE_CANDIDATES, profile.logged_image_candidates(per_gpu_batch))
        self.event(C.OPT_NAME, "sgd_with_momentum")
        self.event(C.OPT_BASE_LR, schedule.lr)
        self.event(C.OPT_LR_WARMUP_STEPS, schedule.warmup_steps)
        self.event(C.OPT_LR_WARMUP_FACTOR, schedule.warmup_factor)
        self.event(C.OPT_LR_DECAY_FACTOR, 0.1)
        self.event(C.OPT_LR_DECAY_STEPS, list(schedule.decay_steps))
        self.event(C.MIN_IMAGE_SIZE, profile.min_size)
        self.event(C.MAX_IMAGE_SIZE, profile.max_size)
        # Not MLPerf keys (the checker ignores them): what `invoke time` plots and describes.
        self.event("quality_target", targets)
        self.event("config_name", config_name)
        self.event("model", profile.model)
