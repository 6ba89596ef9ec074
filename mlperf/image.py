"""A Backend.AI-ready image: build context (Dockerfile, requirements, code), label schema, docker.

Backend.AI sessions cannot run Docker, so the image is built elsewhere from the context written
here, pushed to a registry the Backend.AI domain allows, and registered with
`backend.ai admin image rescan`. Backend.AI reads what it needs from the image's
`ai.backend.*` labels and replaces ENTRYPOINT, CMD and WORKDIR with its own, so the Dockerfile
sets none of them: the code lives in /opt/mlperf (/home/work is a per-session scratch mount) and
/etc/invoke.yaml points Invoke there, so `invoke ...` works from any folder.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlperf import PROJECT_ROOT, project
from mlperf.errors import UserError
from mlperf.files import replace_tree, temporary_name

CODE_DIR = "/opt/mlperf"                 # outside /home/work, which Backend.AI mounts per session
MARKER = ".invoke-image-context"         # marks a folder this module wrote, so it may replace it

# --- label schema ------------------------------------------------------------------------------

KNOWN_FEATURES = {"batch", "query", "uid-match", "user-input", "operation"}
SERVICE_PROTOCOLS = ("tcp", "http", "pty", "preopen")
RESERVED_PORTS = {2000, 2001, 2002, 2003, 2200, 7681}   # the kernel runner, sshd and ttyd use them
_SIZE = re.compile(r"^\d+(\.\d+)?([kmgtpe](i?b)?)?$", re.IGNORECASE)   # Backend.AI BinarySize: 8g, 512m
_DISTRO = re.compile(r"^[a-z]+(-[a-z]+)?(\d+(\.\d+)*)?$")               # ubuntu22.04, centos7.6, static-gnu
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An image reference: [registry[:port]/]path[:tag][@digest], as docker's reference grammar spells it.
_IMAGE_REFERENCE = re.compile(r"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
                              r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
_ABSOLUTE_PATH = re.compile(r"/[\w./+-]+")
# One service-ports entry, as Backend.AI parses it: name:proto:port or name:proto:[port,port,...]
_SERVICE_PORT = re.compile(r"^(?P<name>[\w-]+):(?P<proto>\w+):(?P<ports>\[\d+(?:,\d+)*\]|\d+)$")


@dataclass(frozen=True)
class Problem:
    label: str
    message: str

    def __str__(self) -> str:
        return f"{self.label}: {self.message}"


def _int(value: str, minimum: int) -> str | None:
    if not re.fullmatch(r"\d+", value.strip()) or int(value) < minimum:
        return f"{value!r} is not a whole number >= {minimum}"
    return None


def _number(value: str) -> str | None:
    if not re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        return f"{value!r} is not a non-negative number"
    return None


def _size(value: str) -> str | None:
    if not _SIZE.match(value.strip()):
        return f"{value!r} is not a size like 8g or 512m"
    return None


def _kernelspec(value: str) -> str | None:
    return None if value.strip() == "1" else f"{value!r} must be \"1\""


def _features(value: str) -> str | None:
    features = value.split()
    unknown = sorted(set(features) - KNOWN_FEATURES)
    if unknown:
        return f"unknown feature(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_FEATURES))})"
    if "uid-match" not in features:
        return "must include uid-match, so files written to mounted folders belong to the user"
    return None


def _distro(value: str) -> str | None:
    return None if _DISTRO.match(value) else f"{value!r} is not a distribution like ubuntu22.04"


def _runtime_type(value: str) -> str | None:
    if re.fullmatch(r"[a-z][a-z0-9_-]*", value):
        return None
    return f"{value!r} is not a runtime type like python"


def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") and " " not in value else f"{value!r} is not an absolute path"


def _accelerators(value: str) -> str | None:
    if value and not re.fullmatch(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", value):
        return f"{value!r} is not a comma-separated list like cuda"
    return None


def _corecount(value: str) -> str | None:
    bad = [name for name in value.split(",") if value and not _ENV_NAME.match(name)]
    return f"{', '.join(map(repr, bad))} not environment variable name(s)" if bad else None


def _service_ports(value: str) -> str | None:
    """Backend.AI's syntax: comma-separated name:proto:port, where port may be [p1,p2,...]."""
    if not value:
        return None
    entries = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", value)   # split on commas outside brackets
    if ",".join(entries) != value:
        return f"{value!r} is not a comma-separated list of name:proto:port"
    messages, seen = [], set()
    for entry in entries:
        m = _SERVICE_PORT.match(entry)
        if not m:
            messages.append(f"{entry!r} is not name:proto:port (or name:proto:[port,...])")
            continue
        if m["proto"] not in SERVICE_PROTOCOLS:
            messages.append(f"{entry!r}: protocol {m['proto']!r} is not one of "
                            f"{', '.join(SERVICE_PROTOCOLS)}")
        for port in map(int, m["ports"].strip("[]").split(",")):
            if port in RESERVED_PORTS:
                messages.append(f"{entry!r}: port {port} is reserved by Backend.AI "
                                f"(2000-2003, 2200, 7681)")
            elif not 1024 < port < 65535:
                messages.append(f"{entry!r}: port {port} must be between 1025 and 65534 (no root)")
            elif port in seen:
                messages.append(f"{entry!r}: port {port} is already used by another service")
            seen.add(port)
    return "; ".join(messages) or None


# label -> (required, check). Other ai.backend.* labels are left alone: Backend.AI has more of them.
LABEL_SCHEMA: dict[str, tuple[bool, object]] = {
    "ai.backend.kernelspec": (True, _kernelspec),
    "ai.backend.features": (True, _features),
    "ai.backend.base-distro": (True, _distro),
    "ai.backend.runtime-type": (True, _runtime_type),
    "ai.backend.runtime-path": (True, _absolute_path),
    "ai.backend.resource.min.cpu": (True, lambda v: _int(v, 1)),
    "ai.backend.resource.min.mem": (True, _size),
    "ai.backend.resource.min.cuda.device": (False, lambda v: _int(v, 0)),
    "ai.backend.resource.min.cuda.shares": (False, _number),
    "ai.backend.resource.preferred.shmem": (False, _size),
    "ai.backend.accelerators": (False, _accelerators),
    "ai.backend.envs.corecount": (False, _corecount),
    "ai.backend.service-ports": (False, _service_ports),
}


def validate_labels(labels: dict[str, str]) -> list[Problem]:
    """Every problem with a Dockerfile's Backend.AI labels: missing required ones, malformed values."""
    problems = []
    for name, (required, check) in LABEL_SCHEMA.items():
        if name not in labels:
            if required:
                problems.append(Problem(name, "missing (required by Backend.AI)"))
            continue
        message = check(str(labels[name]))
        if message:
            problems.append(Problem(name, message))
    for name, value in labels.items():
        is_resource = name.startswith(("ai.backend.resource.min.", "ai.backend.resource.max."))
        if is_resource and name not in LABEL_SCHEMA:
            message = _size(value) if name.endswith(".mem") else _number(value)
            if message:
                problems.append(Problem(name, message))
    gpu_minimum = any(k.startswith("ai.backend.resource.min.cuda.") and labels[k].strip() not in ("0", "0.0")
                      for k in labels)
    if gpu_minimum and "cuda" not in labels.get("ai.backend.accelerators", "").split(","):
        problems.append(Problem("ai.backend.accelerators", "must list cuda when a cuda minimum is set"))
    return problems


def dockerfile_labels(text: str) -> dict[str, str]:
    """The final stage's LABELs, parsed by dockerfile-parse (quoting, continuations), with ARG and
    ENV values substituted the way docker does, `${VAR:-default}` and `${VAR:+alternative}` too
    (dockerfile-parse alone leaves ':-4}' of `${X:-4}`)."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)
    known = {**parser.args, **parser.envs}
    return {_substitute(name, known): _substitute(value, known) for name, value in parser.labels.items()}


_VARIABLE = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+])(?P<word>[^}]*))?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def _substitute(text: str, known: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        name = match["name"] or match["bare"]
        value, op = known.get(name), match["op"]
        if op in ("-", ":-"):
            return value if value is not None and (value or op == "-") else match["word"]
        if op in ("+", ":+"):
            return match["word"] if value is not None and (value or op == "+") else ""
        return value or ""
    return _VARIABLE.sub(one, str(text))


def check_dockerfile(path: Path) -> None:
    """`invoke image --check FILE`: print each label problem and exit 1, or one "ok" line."""
    path = Path(path)
    if path.is_dir():
        path = path / "Dockerfile"
    if not path.is_file():
        raise UserError(f"{path}: no such Dockerfile; give the path of a Dockerfile to --check")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (not UTF-8): give the path of a Dockerfile to --check") from None
    problems = validate_labels(dockerfile_labels(text))
    if problems:
        for problem in problems:
            print(f"{path}: {problem}")
        raise UserError(f"{path}: {len(problems)} Backend.AI label problem(s), listed above; fix them and "
                        f"run `invoke image --check {path}` again")
    print(f"ok: {path}: Backend.AI labels are complete and well-formed")


# --- base images -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseProfile:
    distro: str    # ai.backend.base-distro: which krunner (glibc) build Backend.AI mounts
    python: str    # ai.backend.runtime-path: the python that has torch in this base


_NGC_TAG = re.compile(r"^(?P<year>\d{2})\.(?P<month>\d{2})-py3")
_PYTORCH_TAG = re.compile(r"^(?P<major>\d+)\.(?P<minor>\d+)(\.\d+)?-cuda[\d.]+-cudnn\d+-(runtime|devel)$")


def known_base(base: str) -> BaseProfile | None:
    """Distribution and python of the NGC and pytorch/pytorch images, from their tags; None if unknown.

    NGC PyTorch (nvcr.io/nvidia/pytorch:YY.MM-py3), per NVIDIA's framework support matrix: Ubuntu
    22.04 from 23.01, Ubuntu 24.04 from 24.10; python3 in /usr/bin. Older releases moved between
    conda and system Python, so they are left to --distro/--python.
    pytorch/pytorch:<ver>-cuda<x>-cudnn<y>-runtime|devel: conda in /opt/conda, on Ubuntu 18.04 for
    1.x, 20.04 or 22.04 for 2.0-2.1 and 22.04 or newer since. Where the switch is not documented
    per tag we name the older release: Backend.AI's krunner binaries built for an older glibc run
    on a newer one, not the other way round.
    """
    repository, _, tag = base.rpartition(":")
    if "/" in tag or not repository:           # registry port, no tag: nothing to read a version from
        return None
    name = repository.rsplit("/", 1)[-1]
    if name != "pytorch":
        return None
    if m := _NGC_TAG.match(tag):
        release = (int(m["year"]), int(m["month"]))
        if release >= (24, 10):
            return BaseProfile("ubuntu24.04", "/usr/bin/python3")
        if release >= (23, 1):
            return BaseProfile("ubuntu22.04", "/usr/bin/python3")
        return None
    if m := _PYTORCH_TAG.match(tag):
        version = (int(m["major"]), int(m["minor"]))
        distro = "ubuntu18.04" if version < (2, 0) else "ubuntu20.04" if version < (2, 2) else "ubuntu22.04"
        return BaseProfile(distro, "/opt/conda/bin/python3")
    return None


def resolve_base(base: str, distro: str | None = None, python: str | None = None) -> BaseProfile:
    """The base's profile from the table, with --distro/--python overriding; unknown bases need --distro.

    An unknown base is an error rather than a guess: a base-distro newer than the image's real one
    makes Backend.AI mount binaries its glibc cannot run, and the session then fails far from here.
    """
    for flag, value, pattern in (("--base", base, _IMAGE_REFERENCE), ("--distro", distro, _DISTRO),
                                 ("--python", python, _ABSOLUTE_PATH)):
        if value is not None and not pattern.fullmatch(value):
            raise UserError(f"{flag} {value!r} is not a valid {flag[2:]} (it goes into the Dockerfile as it is: "
                            "no spaces, newlines or quotes)")
    profile = known_base(base)
    if profile is None and distro is None:
        raise UserError(
            f"cannot tell the Linux distribution of base image {base!r} (known: "
            f"nvcr.io/nvidia/pytorch:YY.MM-py3 from 23.01, pytorch/pytorch:<ver>-cuda<x>-cudnn<y>-runtime): "
            f"pass --distro (e.g. ubuntu22.04, from /etc/os-release in the image) and --python if "
            f"python3 is not /usr/bin/python3")
    profile = profile or BaseProfile(distro, "/usr/bin/python3")
    return BaseProfile(distro or profile.distro, python or profile.python)


# --- Dockerfile and context --------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """Minimum session resources and shared memory the image asks for (see invoke.yaml image.resources)."""
    cpu: int = 4
    mem: str = "16g"
    gpus: int = 1
    shmem: str = "16g"   # /dev/shm: DataLoader workers pass batches through it; Backend.AI's default is 64m


def image_labels(profile: BaseProfile, resources: Resources) -> dict[str, str]:
    """The ai.backend.* labels for this image. No service-ports: the image adds no services, and
    Backend.AI's own sshd and ttyd (ports 2200, 7681) need no label."""
    return {
        "ai.backend.kernelspec": "1",
        "ai.backend.features": "batch query uid-match user-input",
        "ai.backend.base-distro": profile.distro,
        "ai.backend.accelerators": "cuda",
        "ai.backend.resource.min.cpu": str(resources.cpu),
        "ai.backend.resource.min.mem": str(resources.mem),
        "ai.backend.resource.min.cuda.device": str(resources.gpus),
        "ai.backend.resource.preferred.shmem": str(resources.shmem),
        "ai.backend.runtime-type": "python",
        "ai.backend.runtime-path": profile.python,
        "ai.backend.envs.corecount": "OPENBLAS_NUM_THREADS,OMP_NUM_THREADS,NPROC",
    }


def render_dockerfile(base: str, profile: BaseProfile, labels: dict[str, str]) -> str:
    label_lines = " \\\n      ".join(f'{name}="{value}"' for name, value in labels.items())
    files = [name for name in project.RUNTIME_FILES if name != "requirements.txt"]  # copied first, above
    code_lines = "\n".join([f"COPY {' '.join(files)} {CODE_DIR}/"]
                           + [f"COPY {folder}/ {CODE_DIR}/{folder}/" for folder in project.RUNTIME_DIRS])
    py = profile.python
    return f"""\
# Made by `invoke image` (mlperf/image.py): regenerate it rather than editing it.
# Backend.AI replaces ENTRYPOINT, CMD and WORKDIR with its own, so none is set here; a startup
# step that needs root would go in /opt/container/bootstrap.sh.
FROM {base}

# Backend.AI's entrypoint creates the session user (uid-match) with these; fail here, not at
# session start, if the base lacks one, or lacks the python the runtime-path label names.
RUN for tool in sh getent useradd groupadd usermod; do \\
      command -v "$tool" >/dev/null || {{ echo "base image lacks $tool (Backend.AI needs it)" >&2; exit 1; }}; \\
    done; \\
    for file in /bin/sh {py}; do \\
      test -x "$file" || {{ echo "base image lacks $file (Backend.AI needs it)" >&2; exit 1; }}; \\
    done

# `fab deploy` and `fab results` run rsync on both ends; NGC and pytorch/pytorch bases lack it.
# Unpinned: the base's own Ubuntu release decides the version, as it does for the rest of it.
# hadolint ignore=DL3008
RUN command -v rsync >/dev/null || {{ apt-get update \
 && apt-get install -y --no-install-recommends rsync \
 && rm -rf /var/lib/apt/lists/*; }}

# The pip lines are requirements.txt itself. The base already has a CUDA build of torch and
# torchvision that PyPI's wheels would replace; pinning whatever versions the base has as
# constraints keeps them (pip accepts an installed pre-release such as NGC's 2.6.0a0 for
# torch>=2.4), and installs torch from PyPI only on a base without it. Ubuntu 24.04 marks its
# python "externally managed" (PEP 668); this image is the environment, hence the override.
COPY requirements.txt {CODE_DIR}/requirements.txt
RUN {py} -c "import importlib.metadata as md; [print(d.metadata['Name'] + '==' + d.version) for d in md.distributions() if d.metadata['Name'] in ('torch', 'torchvision')]" > /tmp/base-torch.txt \\
 && PIP_BREAK_SYSTEM_PACKAGES=1 {py} -m pip install --no-cache-dir -c /tmp/base-torch.txt -r {CODE_DIR}/requirements.txt \\
 && rm /tmp/base-torch.txt

# The code outside /home/work (a per-session mount); /etc/invoke.yaml makes `invoke` find it from
# any folder, and PYTHONPATH makes `python -m object_detection.train` work anywhere.
{code_lines}
COPY etc-invoke.yaml /etc/invoke.yaml
RUN {py} -m compileall -q {CODE_DIR}
ENV PYTHONPATH={CODE_DIR}${{PYTHONPATH:+:${{PYTHONPATH}}}}

LABEL {label_lines}
"""


ETC_INVOKE_YAML = f"""\
# System-wide Invoke config in the image: find tasks.py in {CODE_DIR} from any folder, so
# `invoke --list` works in /home/work. Data and results stay relative to the current folder.
tasks:
  search_root: {CODE_DIR}
"""


def default_tag(base: str) -> str:
    """mlperf-maskrcnn:<base tag>, e.g. mlperf-maskrcnn:25.01-py3."""
    repository, _, tag = base.rpartition(":")
    return f"mlperf-maskrcnn:{tag if repository and '/' not in tag else 'latest'}"


def write_context(output: Path, dockerfile: str, source: Path = PROJECT_ROOT) -> None:
    """Write the build context into a temporary folder beside `output`, then rename it into place.

    An existing `output` is replaced only if this module made it (it holds MARKER): a mistyped
    --output never deletes someone's folder.
    """
    output = Path(output).absolute()
    if output.exists() and not (output / MARKER).is_file():
        raise UserError(f"{output} exists and is not a build context made by `invoke image`: "
                        f"choose another --output, or remove it yourself")
    missing = project.missing_runtime(source)
    if missing:
        raise UserError(f"{source / missing[0]} is missing: run `invoke image` from a complete checkout")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(output)
    tmp.mkdir()
    try:
        for relative in project.runtime_files(source):
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, tmp / relative)
        (tmp / "etc-invoke.yaml").write_text(ETC_INVOKE_YAML)
        (tmp / "Dockerfile").write_text(dockerfile)
        (tmp / MARKER).write_text("written by `invoke image`; the folder is replaced on the next run\n")
        replace_tree(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- docker ------------------------------------------------------------------------------------

def docker_daemon_answers() -> bool:
    """True when `docker info` succeeds: a CLI is installed and a daemon answers it."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def has_registry(tag: str) -> bool:
    """True when the image name starts with a registry host (has a dot or port, or is localhost)."""
    first, sep, _ = tag.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def registration_steps(tag: str) -> list[str]:
    """How to get a pushed image into Backend.AI, as lines to print."""
    name = tag if has_registry(tag) else f"REGISTRY/PROJECT/{tag}"
    registry = name.split("/", 1)[0]
    return [
        f"  # push to a registry your Backend.AI domain allows{'' if has_registry(tag) else ', e.g.'}:",
        *([] if has_registry(tag) else [f"  docker tag {tag} {name}", f"  docker push {name}"]),
        f"  backend.ai admin image rescan -r {registry}      # as an admin; REGISTRY as Backend.AI names it",
        f"  backend.ai session create -t mlperf -r cuda.shares=8 -r mem=64g --resource-opts shmem=16g {name}",
    ]


def dockerfile_for(base: str, distro: str | None = None, python: str | None = None,
                   resources: Resources | dict | None = None) -> tuple[str, BaseProfile]:
    """The Dockerfile for `base`, its labels validated like any --check; and the base's profile."""
    if isinstance(resources, dict):
        resources = Resources(**{k: v for k, v in resources.items() if v is not None})
    profile = resolve_base(base, distro, python)
    dockerfile = render_dockerfile(base, profile, image_labels(profile, resources or Resources()))
    problems = validate_labels(dockerfile_labels(dockerfile))
    if problems:   # the overrides (--distro, --python, image.resources) are the only way in
        raise UserError("the image's labels are invalid: " + "; ".join(map(str, problems)))
    return dockerfile, profile


def make_image(base: str, output: Path, tag: str | None = None, build: bool = False, push: bool = False,
               distro: str | None = None, python: str | None = None,
               resources: Resources | dict | None = None) -> Path:
    """Write the build context for `base` to `output`; with build/push, run docker where a daemon answers.

    The generated Dockerfile's labels are validated like any --check; without a daemon, build/push
    print the commands to run elsewhere and fail (the user asked for a build that did not happen).
    """
    dockerfile, profile = dockerfile_for(base, distro, python, resources)
    output = Path(output)
    write_context(output, dockerfile)
    tag = tag or default_tag(base)
    print(f"wrote {output}/ (Dockerfile, requirements.txt, code) for {base}: "
          f"{profile.distro}, {profile.python}; labels ok")
    if not (build or push):
        print(f"build it where Docker runs: docker build -t {tag} {output}   (or: invoke image --build)")
        return output
    if push and not has_registry(tag):
        raise UserError(f"--push needs a tag that names a registry, e.g. --tag "
                        f"cr.example.com/mlperf/{tag}")
    commands = ([["docker", "build", "-t", tag, str(output)]] if build else []) + \
               ([["docker", "push", tag]] if push else [])
    if not docker_daemon_answers():
        print("run these on a machine with Docker (copy the folder there first):")
        for command in commands:
            print("  " + " ".join(command))
        print("then register it in Backend.AI:")
        print("\n".join(registration_steps(tag)))
        raise UserError("no Docker daemon answers here (`docker info` failed), so nothing was built or "
                        "pushed: run the commands above where Docker runs")
    for command in commands:
        print("+ " + " ".join(command), flush=True)
        code = subprocess.run(command, stdout=sys.stdout, stderr=sys.stderr).returncode
        if code != 0:
            raise UserError(f"`{' '.join(command)}` failed with exit code {code}; see its output above")
    print(f"image {tag} {'pushed' if push else 'built'}; to register it in Backend.AI:")
    if not push:
        print(f"  invoke image --push --tag {tag}    # or docker push, with a tag that names your registry")
    print("\n".join(registration_steps(tag)))
    return output
