"""Glue between Invoke/Fabric tasks and the library: the only module that knows Invoke.

Tasks read their defaults from config here (`option`), turn library errors into one line and an
exit code, and hand a step to the host (`fab -H`) or to the background (`--detach`) as the
command line a user would type (`task_argv`). The library below takes plain values.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path

from invoke.exceptions import Exit

from mlperf.errors import UserError


def is_remote(c) -> bool:
    """True when the task runs under `fab -H host`, where `c` is a Fabric Connection.

    Under `fab`, fabric is already imported; under `invoke` it need not be, and importing it
    (paramiko, cryptography) would add ~0.15 s to every local step.
    """
    fabric = sys.modules.get("fabric")
    return fabric is not None and isinstance(c, fabric.Connection)


def require_host(c, task: str) -> None:
    if not is_remote(c):
        raise UserError(f"{task} needs a host: run it through Fabric, e.g. "
                        f"fab -H work@127.0.0.1:9922 -i id_container {task}")


def option(c, value, key: str):
    """A task argument if the user gave one, else the project default `mlperf.<key>` from config."""
    if value is not None:
        return value
    node = c.config.mlperf
    for part in key.split("."):
        node = node[part]
    return node


def storage_dir(c, value, key: str) -> Path:
    """data_dir or results_dir: the flag, else config; in a Backend.AI session whose configured
    folder is on scratch, the one mounted vfolder (mlperf.storage.default_dir says so on stderr)."""
    from mlperf import storage

    explicit = value is not None or any(f"{prefix}_MLPERF_{key.upper()}" in os.environ
                                        for prefix in ("INVOKE", "FABRIC"))
    return storage.default_dir(option(c, value, key), key, explicit)


def dataset_of(c, dataset, manifest):
    """The dataset a task works on: the user's manifest file, else a catalog name (default from config)."""
    from mlperf.datasets import resolve

    return resolve(option(c, dataset, "dataset") if manifest is None else None, manifest)


def task_argv(task: str, kwargs: dict, *, drop: tuple[str, ...] = (), defaults: dict | None = None) -> list[str]:
    """The flags of `invoke <task> ...` for the arguments a user gave.

    None and False mean "not given" and are left out, so the defaults of wherever the command runs
    apply; True becomes a bare flag; names turn underscores into dashes. With the task's declared
    `defaults`, values equal to them are left out too, and False for a default-True option
    becomes --no-<flag> (which would otherwise be lost).
    """
    argv = [task]
    for name, value in kwargs.items():
        default = (defaults or {}).get(name)
        if name in drop or value is None or (defaults and name in defaults and value == default):
            continue
        flag = "--" + name.strip("_").replace("_", "-")
        if value is False:
            if default is True:
                argv.append("--no-" + flag[2:])
        elif value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):  # an iterable option: the flag once per value
            for item in value:
                argv.extend([flag, str(item)])
        else:
            argv.extend([flag, str(value)])
    return argv


def _errors_as_exit(fn):
    """A UserError becomes `error: <message>` and its exit code, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None

    return wrapper


def step(fn):
    """Make a task body a benchmark step.

    Locally the body runs here. Under `fab -H host` the same task, with the arguments the user
    gave, runs on the host (mlperf.remote.forward), so the heavy work happens where the GPUs are.
    A body with a `detach` argument, given --detach, is started in its own session with output to
    a log file (mlperf.jobs), so it survives a dropped SSH connection; `status` and `logs` reattach.
    """
    signature = inspect.signature(fn).parameters
    params = list(signature)[1:]
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    name = fn.__name__.rstrip("_").replace("_", "-")

    @functools.wraps(fn)
    @_errors_as_exit
    def wrapper(c, *args, **kwargs):
        kwargs.update(zip(params, args))
        if is_remote(c):
            from mlperf import remote

            return remote.forward(c, task_argv(name, kwargs, defaults=defaults), option(c, None, "remote.path"))
        if kwargs.get("detach"):
            from mlperf import jobs

            argv = task_argv(name, kwargs, drop=("detach",), defaults=defaults)
            return jobs.start(argv, jobs.jobs_dir(storage_dir(c, kwargs.get("results_dir"), "results_dir")))
        return fn(c, **kwargs)

    return wrapper


def local_only(fn):
    """Like `step`, but the body always runs on this machine (deploy, results...)."""
    return _errors_as_exit(fn)
