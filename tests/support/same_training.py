"""Two models that must train the same function: the same losses, and the same gradient for every
parameter that got one (tests of the speed code against the code it replaces)."""
from __future__ import annotations

import torch


def assert_trains_the_same(got: torch.nn.Module, expected: torch.nn.Module, got_losses: dict, expected_losses: dict,
                           *, loss_rtol: float, loss_atol: float, grad_rtol: float, grad_atol: float = 0.0,
                           grad_atol_of_largest: float = 0.0) -> None:
    """Each of `expected_losses` within (loss_rtol, loss_atol) of `got_losses`' value of that name, and each
    gradient of `got` within grad_rtol and an absolute grad_atol plus grad_atol_of_largest times the largest
    element of `expected`'s gradient (kernels that sum in another order are off by a share of the largest)."""
    for name, value in expected_losses.items():
        torch.testing.assert_close(got_losses[name], value, rtol=loss_rtol, atol=loss_atol)
    theirs = dict(expected.named_parameters())
    for name, parameter in got.named_parameters():
        if parameter.grad is not None:
            atol = grad_atol
            if grad_atol_of_largest:
                atol += grad_atol_of_largest * theirs[name].grad.abs().max().item()
            torch.testing.assert_close(parameter.grad, theirs[name].grad, rtol=grad_rtol, atol=atol)


def one_step_with_and_without(lever: str, **build) -> tuple[dict, dict]:
    """The CPU model (build_model with `build`, 96x128 images) with fast.Options' `lever` off and on, the
    same weights, one float64 training forward and backward on the same two images and samples:
    ({False: model, True: model}, {False: losses, True: losses})."""
    from dataclasses import replace

    from object_detection.fast import Options
    from object_detection.model import build_model

    models = {}
    for on in (False, True):
        torch.manual_seed(0)
        models[on] = build_model(81, min_size=96, max_size=128, speed=replace(Options.for_device("cpu"), **{lever: on}),
                                 **{"backbone_weights": None, **build}).double()
    models[True].load_state_dict(models[False].state_dict())  # the same keys: nothing renamed
    images, targets = two_images_and_targets(torch.Generator().manual_seed(1))
    return models, train_step_each(models, images, targets)


def two_images_and_targets(generator: torch.Generator) -> tuple[list[torch.Tensor], list[dict]]:
    """Two random float64 96x128 images drawn from `generator`, each with the same two boxes and masks."""
    images = [torch.rand(3, 96, 128, generator=generator, dtype=torch.float64) for _ in range(2)]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 20.0, 110.0, 90.0]], dtype=torch.float64)
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 12:70, 10:60] = masks[1, 20:90, 40:110] = 1
    return images, [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}] * 2


def train_step_each(models: dict, images: list[torch.Tensor], targets: list[dict]) -> dict:
    """Each model's training losses on the batch, the same samples drawn for each, and their gradients
    left in its parameters: {key: losses} for models' keys."""
    losses = {}
    for key, model in models.items():
        model.train()
        torch.manual_seed(5)  # the same samples drawn
        losses[key] = model(images, targets)
        sum(losses[key].values()).backward()
    return losses
