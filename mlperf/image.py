"""A Backend.AI-ready image: build context (Dockerfile, requirements, code), the labels it carries
(judged by mlperf.labels), base images (distribution, python, GPU kernels), docker.

Backend.AI sessions cannot run Docker, so the image is built elsewhere from the context written
here, pushed to a registry the Backend.AI domain allows, and registered with
`backend.ai admin image rescan`. Backend.AI reads what it needs from the image's
`ai.backend.*` labels and replaces ENTRYPOINT, CMD and WORKDIR with its own, so the Dockerfile
sets none of them: the code lives in /opt/mlperf (/home/work is a per-session scratch mount) and
/etc/invoke.yaml points Invoke there, so `invoke ...` works from any folder.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlperf import PROJECT_ROOT, project
from mlperf.errors import UserError
from mlperf.files import replace_tree, temporary_name, writing
from mlperf.labels import ABSOLUTE_PATH, DISTRO, IMAGE_REFERENCE, dockerfile_labels, errors, validate_labels

CODE_DIR = "/opt/mlperf"                 # outside /home/work, which Backend.AI mounts per session
PLATFORM = "linux/amd64"                 # Backend.AI agents here are x86-64; docker builds the host's otherwise
MARKER = ".invoke-image-context"         # marks a folder this module wrote, so it may replace it

# --- base images -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseProfile:
    distro: str    # ai.backend.base-distro: which krunner (glibc) build Backend.AI mounts
    python: str    # ai.backend.runtime-path: the python that has torch in this base
    # torch.cuda.get_arch_list() of the base's torch, where a source gives it; None: not known
    arch: tuple[str, ...] | None = None


_NGC_TAG = re.compile(r"^(?P<year>\d{2})\.(?P<month>\d{2})-py3")
_PYTORCH_TAG = re.compile(r"^(?P<major>\d+)\.(?P<minor>\d+)(\.\d+)?-cuda(?P<cuda>[\d.]+)-cudnn\d+-(runtime|devel)$")

# The kernels in each base's torch. Volta (V100, sm_70) is the one that matters here: CUDA 13 has no
# compiler or library support below sm_75 (NVIDIA CUDA 13.0 release notes, "deprecated architectures"),
# and PyTorch's wheels dropped it step by step.
# NGC nvcr.io/nvidia/pytorch:YY.MM-py3: 2024 images set TORCH_CUDA_ARCH_LIST="5.2 6.0 6.1 7.0 7.2 7.5
# 8.0 8.6 8.7 9.0+PTX" (as quoted from them on GitHub; NVIDIA's own per-release "GPU requirements"
# pages for 24.x/25.x were not found, and 2023 images are assumed to match); the CUDA 13 images
# from 25.08 set "7.5 8.0 8.6 9.0 10.0 12.0+PTX" (seen in 25.10 and 26.07 image histories). 25.01 to
# 25.07 (CUDA 12.8/12.9) are not known either way: None, and `invoke doctor` in the session decides.
_NGC_2024 = ("sm_52", "sm_60", "sm_61", "sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_90",
             "compute_90")
_NGC_CUDA13 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
# pytorch/pytorch:<torch>-cuda<x>-...: the torch wheels' lists. PyTorch's RELEASE.md support matrix
# (2.12-2.14) and CUDA upgrade runbook (11.8, 12.6, 12.8 for 2.7); pytorch/pytorch#160269 (2.8-2.10
# keep Volta in 12.8/12.9), #172352 (2.11 drops it from 12.8), #182250 (get_arch_list() of 2.10 and
# 2.11 cu126/cu128); torch/cuda/__init__.py PYTORCH_RELEASES_CODE_CC of torch 2.14. 12.1 and 12.4
# (torch 2.1-2.6) are taken to match 12.6, which the runbook lists with the same architectures.
_CU11 = ("sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
_CU12 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
_CU128 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
_CU13 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
# What a failing check names, first match wins: Volta through Blackwell, then Maxwell/Pascal, then CUDA 13.
SUGGESTED_BASES = ("pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime", "pytorch/pytorch:2.8.0-cuda12.6-cudnn9-runtime",
                   "pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime")


def _pytorch_arch(torch: tuple[int, int], cuda: str) -> tuple[str, ...] | None:
    version = tuple(int(p) for p in cuda.split(".")[:2] if p.isdigit())
    if version[:1] == (11,) and version >= (11, 8):
        return _CU11
    if (12, 1) <= version < (12, 8):
        return _CU12
    if (12, 8) <= version < (13, 0):
        return ("sm_70",) + _CU128 if (2, 8) <= torch < (2, 11) else _CU128 if torch >= (2, 7) else None
    return _CU13 if version >= (13, 0) else None


def known_base(base: str) -> BaseProfile | None:
    """Distribution, python and GPU kernels of the NGC and pytorch/pytorch images, from their tags;
    None if unknown.

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
        arch = _NGC_CUDA13 if release >= (25, 8) else None if release >= (25, 1) else _NGC_2024
        if release >= (24, 10):
            return BaseProfile("ubuntu24.04", "/usr/bin/python3", arch)
        if release >= (23, 1):
            return BaseProfile("ubuntu22.04", "/usr/bin/python3", arch)
        return None
    if m := _PYTORCH_TAG.match(tag):
        version = (int(m["major"]), int(m["minor"]))
        distro = "ubuntu18.04" if version < (2, 0) else "ubuntu20.04" if version < (2, 2) else "ubuntu22.04"
        return BaseProfile(distro, "/opt/conda/bin/python3", _pytorch_arch(version, m["cuda"]))
    return None


def resolve_base(base: str, distro: str | None = None, python: str | None = None) -> BaseProfile:
    """The base's profile from the table, with --distro/--python overriding; unknown bases need --distro.

    An unknown base is an error rather than a guess: a base-distro newer than the image's real one
    makes Backend.AI mount binaries its glibc cannot run, and the session then fails far from here.
    """
    for flag, value, pattern in (("--base", base, IMAGE_REFERENCE), ("--distro", distro, DISTRO),
                                 ("--python", python, ABSOLUTE_PATH)):
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
    return BaseProfile(distro or profile.distro, python or profile.python, profile.arch)


# --- GPU architectures -------------------------------------------------------------------------
# CUDA's binary compatibility (CUDA C++ Programming Guide, "Binary Compatibility"; the same rule as
# torch.cuda._CompatInterval): a cubin built for compute capability X.y runs on X.z for z >= y, never
# on another major; an architecture-specific sm_XYa cubin runs on X.Y only. PTX (compute_XY) is
# compiled by the driver for any X.Y or newer, if the driver is at least as new as the CUDA that
# made it. Jetson (Tegra) exceptions are left out: Backend.AI agents here are x86-64 servers.

_ARCH = re.compile(r"(?P<kind>sm|compute)_(?P<major>\d+?)(?P<minor>\d)(?P<suffix>[af]?)")


def parse_capability(text: str) -> tuple[int, int]:
    """sm_70, 7.0 or 70 -> (7, 0); ValueError for anything else."""
    text = text.strip().lower()
    m = re.fullmatch(r"(?:sm_)?(\d+?)(\d)", text) or re.fullmatch(r"(\d+)\.(\d)", text)
    if not m:
        raise ValueError(f"{text!r} is not a compute capability like sm_70 or 7.0")
    return int(m[1]), int(m[2])


def sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def kernels_for(arch_list, capability: tuple[int, int]) -> str | None:
    """'cubin' when a binary in arch_list runs on a GPU of this capability, 'ptx' when only PTX
    compiles for it, None when nothing does. Entries that are not sm_/compute_ (ROCm) are skipped."""
    found = None
    for entry in arch_list:
        m = _ARCH.fullmatch(entry.strip())
        if not m:
            continue
        built = (int(m["major"]), int(m["minor"]))
        if m["suffix"] == "a":
            runs = capability == built
        elif m["kind"] == "sm" or m["suffix"] == "f":
            runs = capability[0] == built[0] and capability[1] >= built[1]
        else:
            runs = capability >= built
        if runs and m["kind"] == "sm":
            return "cubin"
        found = found or ("ptx" if runs else None)
    return found


def base_for(capabilities) -> str | None:
    """A base from SUGGESTED_BASES with binaries for every one of these GPUs, or None."""
    for base in SUGGESTED_BASES:
        arch = known_base(base).arch
        if all(kernels_for(arch, cap) == "cubin" for cap in capabilities):
            return base
    return None


def _version(text) -> tuple[int, int] | None:
    if isinstance(text, tuple):
        return text
    m = re.match(r"(\d+)\.(\d+)", str(text or ""))
    return (int(m[1]), int(m[2])) if m else None


def gpu_arch_problem(arch_list, capabilities, torch_cuda: str | None = None,
                     driver_cuda: tuple[int, int] | str | None = None) -> str | None:
    """Why this torch cannot run on these GPUs, or None when it can (or nothing is known).

    arch_list: torch.cuda.get_arch_list(); capabilities: each GPU's (major, minor), None if unknown;
    torch_cuda: torch.version.cuda; driver_cuda: the newest CUDA the driver (or the forward-compat
    libcuda the loader finds first) supports, as cuDriverGetVersion reports it.
    """
    torch_v, driver_v = _version(torch_cuda), _version(driver_cuda)
    if torch_v and driver_v and driver_v[0] < torch_v[0]:
        return (f"the driver supports CUDA {driver_v[0]}.{driver_v[1]} but torch is built for CUDA "
                f"{torch_cuda}: update the driver, or use a base built for CUDA {driver_v[0]}.x")
    caps = sorted({cap for cap in capabilities if cap})
    if not any(_ARCH.fullmatch(e.strip()) for e in arch_list) or not caps:
        return None
    missing = [cap for cap in caps if kernels_for(arch_list, cap) is None]
    old_driver = torch_v and driver_v and driver_v < torch_v
    jit_fails = [cap for cap in caps if old_driver and kernels_for(arch_list, cap) == "ptx"]
    if not missing and not jit_fails:
        return None
    built = " ".join(arch_list)
    if not missing:
        return (f"torch has only PTX for {', '.join(map(sm, jit_fails))} ({built}), and the driver (CUDA "
                f"{driver_v[0]}.{driver_v[1]}) is older than the CUDA {torch_cuda} that made it: update the driver")
    suggestion = base_for(caps)
    fix = (f"build the image from a base that has them, e.g. invoke image --base {suggestion}"
           if suggestion else "no base in mlperf/image.py's table has them")
    if all(kernels_for(_CU12, cap) == "cubin" for cap in caps):
        fix += " (outside an image: pip install torch --index-url https://download.pytorch.org/whl/cu126)"
    return (f"torch has no kernels for {', '.join(map(sm, missing))} (built for {built}; CUDA 13 and "
            f"recent torch wheels dropped Volta sm_70): {fix}")


def base_gpu_problem(base: str, profile: BaseProfile, gpu_arch: str) -> str | None:
    """`invoke image --gpu-arch`: why `base` cannot run on these GPUs, when the table knows; else None."""
    try:
        caps = [parse_capability(part) for part in str(gpu_arch).split(",") if part.strip()]
    except ValueError as exc:
        raise UserError(f"--gpu-arch / image.gpu_arch: {exc}; give e.g. sm_70, or sm_70,sm_80 for "
                        f"mixed GPUs") from None
    if profile.arch is None:
        return None
    missing = [cap for cap in caps if kernels_for(profile.arch, cap) is None]
    if not missing:
        return None
    suggestion = base_for(caps)
    return (f"base {base} has no kernels for {', '.join(map(sm, missing))} (its torch is built for "
            f"{' '.join(profile.arch)}): use " + (f"--base {suggestion}" if suggestion else "another base")
            + ", or leave out --gpu-arch to build anyway")


# --- Dockerfile and context --------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """Minimum session resources and shared memory the image asks for (see invoke.yaml image.resources)."""
    cpu: int = 4
    mem: str = "16g"
    gpus: int = 1
    shmem: str = "16g"   # /dev/shm: DataLoader workers pass batches through it; Backend.AI's default is 64m


# `invoke image --cpu-only`: minimums an agent without GPUs schedules (one CPU slot), for a rehearsal
# of the Backend.AI path with --dataset shapes; the session asks for what it needs above them.
CPU_ONLY = Resources(cpu=1, mem="1g", gpus=0, shmem="256m")


def image_labels(profile: BaseProfile, resources: Resources) -> dict[str, str]:
    """The ai.backend.* labels for this image. No service-ports: the image adds no services, and
    Backend.AI's own sshd and ttyd (ports 2200, 7681) need no label. With no GPU minimum the image
    names no accelerator and no cuda slot, so an agent without the CUDA plugin can run it."""
    labels = {
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
    if str(resources.gpus).strip() == "0":
        del labels["ai.backend.accelerators"], labels["ai.backend.resource.min.cuda.device"]
    return labels


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

# CUDA forward compatibility: with a driver older than the base's CUDA, libcuda must come from
# /usr/local/cuda/compat/lib (data-center GPUs). NGC sets this up around its entrypoint, which
# Backend.AI replaces; Lablup's NGC-based images therefore put the folder on LD_LIBRARY_PATH in ENV
# (backend.ai-kernels vendor/ngc-pytorch/Dockerfile.25.01-pytorch2.6-py312-cuda12.8), and so does
# this image, keeping the base's value after it. A base without the folder is unaffected; a compat
# libcuda older than the host's driver makes CUDA fail (error 803), which `invoke doctor` reports.
ENV LD_LIBRARY_PATH=/usr/local/cuda/compat/lib${{LD_LIBRARY_PATH:+:${{LD_LIBRARY_PATH}}}}

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
    tmp = temporary_name(output)
    with writing("--output", output.parent):
        output.parent.mkdir(parents=True, exist_ok=True)
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
        f"  backend.ai session create -t mlperf --arch x86_64 -r cuda.shares=8 -r mem=64g "
        f"--resource-opts shmem=16g {name}",
    ]


def dockerfile_for(base: str, distro: str | None = None, python: str | None = None,
                   resources: Resources | dict | None = None) -> tuple[str, BaseProfile]:
    """The Dockerfile for `base`, its labels validated like any --check; and the base's profile."""
    if isinstance(resources, dict):
        resources = Resources(**{k: v for k, v in resources.items() if v is not None})
    profile = resolve_base(base, distro, python)
    dockerfile = render_dockerfile(base, profile, image_labels(profile, resources or Resources()))
    problems = errors(validate_labels(dockerfile_labels(dockerfile)))
    if problems:   # the overrides (--distro, --python, image.resources) are the only way in
        raise UserError("the image's labels are invalid: " + "; ".join(map(str, problems)))
    return dockerfile, profile


def make_image(base: str, output: Path, tag: str | None = None, build: bool = False, push: bool = False,
               distro: str | None = None, python: str | None = None,
               resources: Resources | dict | None = None, gpu_arch: str | None = None,
               cpu_only: bool = False) -> Path:
    """Write the build context for `base` to `output`; with build/push, run docker where a daemon answers.

    The generated Dockerfile's labels are validated like any --check; without a daemon, build/push
    print the commands to run elsewhere and fail (the user asked for a build that did not happen).
    gpu_arch (e.g. sm_70): the sessions' GPUs; a base known to lack kernels for them is refused.
    cpu_only: CPU_ONLY's minimums instead of `resources`, and a tag ending in -cpu by default.
    """
    if cpu_only and gpu_arch:
        raise UserError("--cpu-only makes an image for agents without GPUs: leave out --gpu-arch "
                        "(and image.gpu_arch)")
    resources = CPU_ONLY if cpu_only else resources
    dockerfile, profile = dockerfile_for(base, distro, python, resources)
    if gpu_arch:
        problem = base_gpu_problem(base, profile, gpu_arch)
        if problem:
            raise UserError(problem)
        print(f"{base}: {'has kernels for ' + gpu_arch if profile.arch else 'GPU kernels not known'}"
              f"{'' if profile.arch else '; invoke doctor in a session checks them'}")
    output = Path(output)
    write_context(output, dockerfile)
    tag = tag or default_tag(base) + ("-cpu" if cpu_only else "")
    print(f"wrote {output}/ (Dockerfile, requirements.txt, code) for {base}: "
          f"{profile.distro}, {profile.python}; labels ok{'; CPU only (no GPU minimum)' if cpu_only else ''}")
    if not (build or push):
        print(f"build it where Docker runs: docker build --platform {PLATFORM} -t {tag} {output}   "
              f"(or: invoke image --build)")
        return output
    if push and not has_registry(tag):
        raise UserError(f"--push needs a tag that names a registry, e.g. --tag "
                        f"cr.example.com/mlperf/{tag}")
    commands = ([["docker", "build", "--platform", PLATFORM, "-t", tag, str(output)]] if build else []) + \
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
