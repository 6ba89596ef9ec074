"""Training health lives in the engine: every rank reads the loss every --print-freq steps (the
one synchronisation the progress display needs anyway) and a loss that is not finite stops the run
with one line and run_stop aborted, whatever the console shows."""
from __future__ import annotations

import torch

from conftest import mllog
from object_detection import engine, train


def test_a_loss_that_goes_infinite_stops_the_run_with_one_line(tiny_shapes, tmp_path, monkeypatch, capsys):
    steps = []
    real_step = engine.train_step

    def step_that_diverges(*args, **kwargs):
        loss, losses = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) >= 2:  # from the second step on, as a too-high learning rate would make it
            losses = {**losses, "loss_box_reg": torch.tensor(float("inf"))}
            loss = sum(losses.values())
        return loss, losses

    monkeypatch.setattr(engine, "train_step", step_that_diverges)
    log = tmp_path / "result_0.txt"
    code = train.main([f"--data-root={tiny_shapes['data_dir'] / 'tiny'}", "--dataset=tiny", "--profile=shapes-cpu",
                       "--per-gpu-batch=4", "--workers=0", f"--result-log={log}", "--device=cpu",
                       "--num-classes=4", "--max-epochs=3", "--print-freq=1", "--seed=1"])
    err = capsys.readouterr().err
    assert code == 1 and len(steps) == 2  # stopped at the step that went wrong, not at an epoch's end
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "loss_box_reg inf" in lines[0] and "iteration 2" in lines[0], err
    assert "Traceback" not in err
    events = mllog(log)
    assert [e["value"]["status"] if isinstance(e["value"], dict) else e["metadata"]["status"]
            for e in events if e["key"] == "run_stop"] == ["aborted"]
    assert [e["metadata"]["epoch_num"] for e in events if e["key"] == "epoch_stop"] == [1]
    assert not [e for e in events if e["key"] == "eval_accuracy"]


def test_the_console_only_shows_what_the_engine_read(capsys):
    from object_detection.console import Console

    console = Console(True, interactive=False)
    console.epoch_start(1, 3, 8)
    console.step(1, 1, None, 0.01)                      # nothing read yet: nothing shown
    console.step(2, 2, {"loss": 1.5, "loss_mask": 0.5}, 0.01)
    console.step(3, 3, None, 0.01)                      # the epoch's last step shows the last reading
    out = capsys.readouterr().out
    assert "epoch 1 iter 2 loss=1.5000 loss_mask=0.5000" in out
