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
