"""Training health lives in the engine: every rank reads the loss every --print-freq steps (the
one synchronisation the progress display needs anyway) and a loss that is not finite stops the run
with one line and run_stop aborted, whatever the console shows."""
from __future__ import annotations

import pytest

from contextlib import nullcontext

import torch

from conftest import mllog
from object_detection import engine, train


@pytest.mark.slow
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


class _Quadratic(torch.nn.Module):
    """A model with train_step's interface whose first loss is large enough to overflow any scale."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        loss = self.layer(images).pow(2).sum()
        return {"loss": loss * (1e10 if self.calls == 1 else 1.0)}


def test_an_fp16_step_the_scaler_skips_leaves_the_optimizer_as_if_it_never_ran():
    """torch's fused SGD keeps uninitialised momentum buffers after a first step the GradScaler
    skips (the usual start of an fp16 run), and the weights go non-finite a few steps later (seen on
    an H100: every fp16 run of the closed profile stopped within 10 steps). With loss scaling the
    optimizer is the unfused one, so a skipped step changes nothing."""
    runs = {}
    for name, fused in (("trainer's", True), ("unfused", False)):
        torch.manual_seed(0)
        model = _Quadratic()
        optimizer = engine.make_optimizer(model, 0.1, fused=fused, loss_scaled=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
        torch.full((4096,), 7.0)  # leaves non-zero memory for an empty_like to pick up
        inputs = torch.Generator().manual_seed(1)
        for _ in range(4):
            engine.train_step(model, optimizer, scaler, torch.randn(8, 4, generator=inputs), None, nullcontext)
        runs[name] = [p.detach().clone() for p in model.parameters()]
        assert scaler.get_scale() < 2.0 ** 100  # the first step overflowed and was skipped
    assert all(torch.isfinite(p).all() for p in runs["trainer's"])
    assert all(torch.equal(a, b) for a, b in zip(runs["trainer's"], runs["unfused"]))
    assert engine.make_optimizer(_Quadratic(), 0.1, fused=True).defaults["fused"]  # bf16 and fp32 keep it
