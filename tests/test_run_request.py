"""The typed run request (object_detection/run_request.py) is the one home of the options a user gives
a run: what the task asks for reaches the trainer's parser unchanged, and each option's help is the
same in `invoke train --help` and the trainer's."""
from __future__ import annotations

import pytest

import subprocess
import sys
from dataclasses import fields

from conftest import ROOT, run_invoke
from object_detection import train
from object_detection.run_request import RunRequest

REQUIRED = ["--data-root=/nowhere", "--result-log=/nowhere/log.txt"]


def test_every_option_reaches_the_trainer_as_asked():
    asked = RunRequest(seed=7, max_epochs=3, ruleset="3.0.0", submitter="Org", status="onprem",
                       speed="fast-without:prefetch", resume=True)
    parsed = train.parse_args(REQUIRED + asked.trainer_argv())
    assert {f.name: getattr(parsed, f.name) for f in fields(RunRequest)} == vars(asked)


def test_options_left_out_take_the_trainer_s_defaults():
    assert RunRequest().trainer_argv() == []
    parsed = train.parse_args(REQUIRED)
    assert (parsed.seed, parsed.max_epochs, parsed.speed, parsed.resume, parsed.status) == (None, None, "fast",
                                                                                            False, "cloud")


@pytest.mark.slow
def test_the_task_and_the_trainer_show_each_option_s_one_help():
    task_help = run_invoke(["train", "--help"], check=True).stdout
    trainer_help = subprocess.run([sys.executable, "-m", "object_detection.train", "--help"], cwd=ROOT,
                                  text=True, capture_output=True, check=True).stdout
    for name, text in RunRequest.helps().items():
        words = text.split()[:6]
        assert " ".join(words) in " ".join(task_help.split()), name
        assert " ".join(words) in " ".join(trainer_help.split()), name
