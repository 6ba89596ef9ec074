"""What rank 0 shows a person while it trains (the MLPerf records go to the result file).

On a terminal: a progress bar per epoch (images, img/s, loss, lr, ETA) and one line per evaluation.
Off a terminal (a log file, --detach, a pipe): a plain line every PROGRESS_SECONDS and at each
epoch's end, in the form `epoch E iter I loss=... <parts> lr=... R img/s`. It shows the loss the
engine last read (engine.train_one_epoch: every few steps, which is also where divergence is
caught); it never reads the GPU itself.
"""
from __future__ import annotations

import os
import sys
import time

PROGRESS_SECONDS = float(os.environ.get("MLPERF_PROGRESS_SECONDS", "10"))


class Console:
    def __init__(self, enabled: bool, *, interactive: bool | None = None):
        self.enabled = enabled
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.bar = None
        self.reading: tuple[int, dict[str, float]] | None = None  # (iteration, loss and parts)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def epoch_start(self, epoch: int, steps: int, images_per_step: int) -> None:
        self.epoch, self.steps, self.images_per_step = epoch, steps, images_per_step
        self.started = self.last_shown = time.time()
        self.seen = 0
        if self.enabled and self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=steps * images_per_step, desc=f"epoch {epoch}", unit="img", leave=False,
                            dynamic_ncols=True, file=sys.stdout)

    def step(self, iteration: int, step: int, reading: dict[str, float] | None, lr: float) -> None:
        """After a training step: advance the bar; show the loss the engine read, if it read one
        now (`reading`: the loss and its parts), or the last one."""
        if not self.enabled:
            return
        self.seen += self.images_per_step
        last = step == self.steps
        now = time.time()
        if reading is not None:
            self.reading = (iteration, reading)
        if self.bar is not None:
            self.bar.update(self.images_per_step)
            if reading is not None:
                self.bar.set_postfix(loss=f"{reading['loss']:.3f}", lr=f"{lr:.4g}", refresh=False)
            return
        if self.reading is not None and (last or now - self.last_shown >= PROGRESS_SECONDS):
            self.last_shown = now
            read_at, values = self.reading
            parts = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "loss")
            rate = self.seen / max(now - self.started, 1e-9)
            left = (self.steps - step) * self.images_per_step / rate if rate else 0
            print(f"epoch {self.epoch} iter {read_at} loss={values['loss']:.4f} {parts} lr={lr:.5f} "
                  f"{rate:.1f} img/s ({step}/{self.steps} steps, ETA {_duration(left)})", flush=True)

    def epoch_end(self) -> None:
        elapsed = time.time() - self.started
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.line(f"epoch {self.epoch}: {self.seen} images in {elapsed:.1f} s ({self.seen / elapsed:.1f} img/s)")

    def evaluation(self, epoch: int, scores: dict, targets: dict, seconds: float) -> None:
        met = scores["bbox"] >= targets["BBOX"] and scores["segm"] >= targets["SEGM"]
        self.line(f"epoch {epoch} evaluation: BBOX {scores['bbox']:.4f} (target {targets['BBOX']:g}), "
                  f"SEGM {scores['segm']:.4f} (target {targets['SEGM']:g}) in {seconds:.1f} s"
                  + (" (inference {inference:.1f} s, scoring {scoring:.1f} s)".format(**scores["seconds"])
                     if "seconds" in scores else "")
                  + (": target reached" if met else ""))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
