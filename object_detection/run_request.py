"""What a user asks of one training run beyond the dataset and the hardware, typed, each option with
its one help text. It travels from the tasks (`invoke train`, each run of `invoke time`) through the
launcher's plan (mlperf.planning) to the trainer's command line; the task's help, the plan, the
trainer's argv and the trainer's parser all read it here, so a new option is a field here and a
parameter of the task. Importable without torch: the automation builds it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from object_detection import fast
from object_detection.recipe import RULESET

STATUSES = ("onprem", "cloud", "preview", "research")  # submission_status values the checker accepts


def speed_spec(text: str) -> str:
    """--speed, checked by the switch itself (fast.options_for), in one line."""
    try:
        fast.options_for(text, "cpu")
    except ValueError as bad:
        raise argparse.ArgumentTypeError(str(bad)) from None
    return text


def _option(help_text: str, **parser) -> object:
    """A field: None in a request means the trainer's default (`parser["default"]`)."""
    return field(default=None, metadata={"help": help_text, "parser": parser})


@dataclass(frozen=True)
class RunRequest:
    seed: int | None = _option("master seed (default: drawn at random and logged)", type=int)
    max_epochs: int | None = _option("stop with status aborted after this many epochs (default: the profile's cap)",
                                     type=int)
    ruleset: str | None = _option("MLPerf Training ruleset whose reference convergence points give the schedule "
                                  f"(default {RULESET})", default=RULESET)
    submitter: str | None = _option("submission_org in the logs: your organisation as MLCommons knows it "
                                    "(default: invoke.yaml)", default="Backend.AI MLPerf")
    status: str | None = _option(f"submission_status in the logs: {', '.join(STATUSES)} (default: invoke.yaml)",
                                 default="cloud", choices=STATUSES)
    speed: str | None = _option("fast (default) or stock: torchvision's model code, pycocotools' evaluation and a "
                                "plain loop, none of object_detection.fast (the baseline, and a first check when a "
                                "run misbehaves only with the speed code); fast-without:LEVER[,LEVER...] turns "
                                "single levers off, fast-with:LEVER[,LEVER...] on",
                                default="fast", type=speed_spec)
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint of this log's run",
                                                  "parser": {"action": "store_true"}})

    def trainer_argv(self) -> list[str]:
        """The trainer's flags for what was asked (nothing for what was left to its defaults)."""
        argv = []
        for option in fields(self):
            value, flag = getattr(self, option.name), "--" + option.name.replace("_", "-")
            if option.metadata["parser"].get("action") == "store_true":
                argv += [flag] if value else []
            elif value is not None:
                argv.append(f"{flag}={value}")
        return argv

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The trainer's parser gets every option, with its help and its default."""
        for option in fields(cls):
            parser.add_argument("--" + option.name.replace("_", "-"), help=option.metadata["help"],
                                **option.metadata["parser"])

    @classmethod
    def helps(cls) -> dict[str, str]:
        """Each option's help, for the tasks' --help."""
        return {option.name: option.metadata["help"] for option in fields(cls)}
