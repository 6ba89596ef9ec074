"""Glue between Invoke/Fabric tasks and the library: config defaults, errors, remote forwarding."""
from __future__ import annotations

import functools
import inspect
import sys

from invoke.exceptions import Exit

from mlperf.errors import UserError


def is_remote(c) -> bool:
    """True when the task runs under `fab -H host`, where `c` is a Fabric Connection.

    Under `fab`, fabric is already imported; under `invoke` it need not be, and importing it
    (paramiko, cryptography) would add ~0.15 s to every local step.
    """
    fabric = sys.modules.get("fabric")
    return fabric is not None and isinstance(c, fabric.Connection)


def option(c, value, key: str):
    """A task argument if the user gave one, else the project default `mlperf.<key>` from config."""
    if value is not None:
        return value
    node = c.config.mlperf
    for part in key.split("."):
        node = node[part]
    return node


def dataset_of(c, dataset, manifest):
    """The dataset a task works on: the user's manifest file, else a catalog name (default from config)."""
    from mlperf.datasets import resolve

    return resolve(option(c, dataset, "dataset") if manifest is None else None, manifest)


def step(fn):
    """Make a task body a benchmark step.

    Locally the body runs here and a UserError becomes one line and exit code 1. Under
    `fab -H host` the same task, with the arguments the user gave, runs on the host through
    `c.run` (mlperf.remote.forward), so the heavy work happens where the GPUs are. A body with a
    `detach` argument, given --detach, is started in its own session with output to a log file
    (mlperf.jobs), so it survives a dropped SSH connection; `status` and `logs` reattach.
    """
    signature = inspect.signature(fn).parameters
    params = list(signature)[1:]
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    name = fn.__name__.rstrip("_").replace("_", "-")

    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        kwargs.update(zip(params, args))
        try:
            if is_remote(c):
                from mlperf import remote

                return remote.forward(c, name, kwargs, defaults=defaults)
            if kwargs.get("detach"):
                from mlperf import jobs

                return jobs.detach(c, name, kwargs, defaults=defaults)
            return fn(c, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def local_only(fn):
    """Like `step`, but the body always runs on this machine (deploy, results, logs...)."""

    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        try:
            return fn(c, *args, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper
