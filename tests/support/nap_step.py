"""A step that takes as long as a test wants and ends with the exit code it wants, for the
background-job tests: real steps finish too fast or depend on data. `nap` goes through the same
`step` decorator (and so the same --detach, forwarding and error paths) as every project task.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Appended to a tasks.py that defines `ns` (the deployed copy on the test's "remote" host).
NAP_SOURCE = '''

# --- added by the tests (tests/support/nap_step.py) ---
import time as _time

from invoke import task as _task
from invoke.exceptions import Exit as _Exit

from mlperf.tasking import step as _step


@_task(help={"seconds": "how long", "code": "exit code at the end", "detach": "run in the background",
             "results_dir": "where --detach keeps the job (<results_dir>/jobs)"})
@_step
def nap(c, seconds=1, code=0, results_dir=None, detach=False):
    """Print, sleep, print, exit with --code."""
    print("napping", flush=True)
    _time.sleep(float(seconds))
    print("woke up", flush=True)
    if int(code):
        raise _Exit(code=int(code))


ns.add_task(nap)
'''


def make_harness(folder: Path) -> Path:
    """A folder whose tasks.py and fabfile.py hold the project's tasks plus `nap`.

    Run `invoke`/`fab` from it with PYTHONPATH=<project root>; a detached job started there runs
    in that folder too, so it finds `nap` the same way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('project_tasks', {str(ROOT / 'tasks.py')!r})\n"
        "_project = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_project)\n"
        "ns = _project.ns\n" + NAP_SOURCE)
    (folder / "fabfile.py").write_text("from tasks import ns  # noqa: F401\n")
    return folder


def add_nap_to(project: Path) -> None:
    """Give a deployed copy of the project the `nap` task too."""
    with open(project / "tasks.py", "a") as fh:
        fh.write(NAP_SOURCE)
