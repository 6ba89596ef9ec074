"""`invoke doctor`: the readiness table, and exit 1 with what to do when something required is missing."""
from __future__ import annotations

import os
import re

import pytest

from conftest import run_invoke
from mlperf.datasets import load_manifest
from mlperf.datasets.fetch import space_needed
from mlperf.doctor import check_cluster, check_interconnect, check_requirements

HUGE = """\
name: huge
files:
  - name: big.zip
    url: http://127.0.0.1:9/big.zip
    md5: 0123456789abcdef0123456789abcdef
    size: 1000000000000000000
    extract: true
splits:
  val: {images: val2017, annotations: annotations/instances_val2017.json}
"""


@pytest.mark.slow
def test_doctor_fails_when_the_dataset_cannot_fit(tmp_path, sandbox):
    manifest = tmp_path / "huge.yaml"
    manifest.write_text(HUGE)
    proc = run_invoke(["doctor", "--manifest", str(manifest)], env=sandbox)
    assert proc.returncode == 1, proc.stdout
    assert re.search(r"^disk\s+FAIL\s+.*huge still needs", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^package invoke\s+ok", proc.stdout, re.MULTILINE)
    assert re.search(r"^/dev/shm\s+(ok|warn)", proc.stdout, re.MULTILINE)
    assert re.search(r"^dataset huge\s+warn\s+not fetched", proc.stdout, re.MULTILINE)
    assert re.search(r"^InfiniBand\s+(ok|warn)\s", proc.stdout, re.MULTILINE)
    assert re.search(r"^NCCL variables\s+ok\s", proc.stdout, re.MULTILINE)
    error = proc.stderr.strip()
    assert error.startswith("error: ") and "disk: free" in error and "--data-dir" in error
    assert "Traceback" not in proc.stderr


def test_requirements_are_checked_against_installed_versions():
    rows = {r.name: r for r in check_requirements([
        "# a comment", "-r other.txt", "invoke>=2.2,<3   # why", "invoke>=99",
        "no-such-package-for-doctor>=1", "pyyaml",
    ])}
    assert rows["package invoke"].level == "FAIL" and "needs >=99" in rows["package invoke"].found
    assert rows["package no-such-package-for-doctor"].level == "FAIL"
    assert "pip install" in rows["package no-such-package-for-doctor"].advice
    assert rows["package pyyaml"].level == "ok"
    ok_range = check_requirements(["invoke>=2.2,<3"])
    assert [r.level for r in ok_range] == ["ok"]


def test_space_needed_counts_what_is_left(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(HUGE.replace("1000000000000000000", "1000"))
    ds = load_manifest(manifest)
    assert sum(space_needed(ds, tmp_path / "data")) == 2000   # download + unpacked copy
    downloads = ds.downloads(tmp_path / "data")
    downloads.mkdir(parents=True)
    (downloads / "big.zip.part").write_bytes(b"x" * 400)     # a partial download resumes
    assert sum(space_needed(ds, tmp_path / "data")) == 1600


def test_cluster_variables_are_reported_and_checked():
    assert check_cluster({}) == []
    [row] = check_cluster({"BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_SIZE": "2",
                           "BACKENDAI_CLUSTER_HOST": "main1"})
    assert row.level == "ok" and "hosts=main1,sub1" in row.found
    [row] = check_cluster({"BACKENDAI_CLUSTER_HOSTS": "main1", "BACKENDAI_CLUSTER_SIZE": "2"})
    assert row.level == "warn"


@pytest.mark.slow
def test_doctor_fails_a_torch_without_kernels_for_the_gpus(tmp_path, sandbox):
    """The seed's cluster: 8 x V100 (sm_70). No GPU can exist here, so an `nvidia-smi` on PATH
    answers doctor's query as a V100 host's driver does; torch is this venv's real one, whose
    arch list decides."""
    import torch
    from mlperf.image import kernels_for

    if torch.version.cuda is None:
        pytest.skip("this venv's torch is a CPU-only build: it has no arch list to compare")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    gpu_line = "$i, GPU-0000000$i-0000-0000-0000-000000000000, Tesla V100-SXM2-32GB, 32768, 535.104.05, 7.0"
    smi.write_text(f'#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "{gpu_line}"; done\n')
    smi.chmod(0o755)
    env = {**sandbox, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_invoke(["doctor"], env=env)
    row = re.search(r"^GPU arch\s+(\S+)\s+(.*)$", proc.stdout, re.MULTILINE)
    assert row, proc.stdout
    assert "GPUs sm_70;" in row.group(2) and " ".join(torch.cuda.get_arch_list()) in row.group(2)
    if kernels_for(torch.cuda.get_arch_list(), (7, 0)):
        assert row.group(1) == "ok", row.group(0)
    else:   # torch 2.11+ cu128/cu130 wheels and CUDA 13 builds: no Volta
        assert row.group(1) == "FAIL" and proc.returncode == 1
        assert "GPU arch: torch has no kernels for sm_70" in proc.stderr
        assert "invoke image --base pytorch/pytorch:" in proc.stderr


def test_gpu_arch_row_is_there_exactly_when_there_are_gpus_and_a_cuda_torch():
    """On this host as it is: no row without GPUs (or with a CPU-only torch), one row with them."""
    import torch
    from mlperf import host
    from mlperf.doctor import check_gpu_arch

    rows = check_gpu_arch()
    if host.gpus() and torch.version.cuda:
        assert [r.name for r in rows] == ["GPU arch"] and rows[0].level in ("ok", "warn", "FAIL")
    else:
        assert rows == []


CLUSTER_ENV = {"BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_HOST": "main1",
               "BACKENDAI_CLUSTER_SIZE": "2", "MLPERF_SSH_CONFIG": "/dev/null"}


def test_infiniband_devices_and_the_nccl_variables_are_reported(tmp_path):
    """/dev/infiniband and /sys/class/infiniband cannot exist here: folders with their entries' names."""
    devices, adapters = tmp_path / "dev-infiniband", tmp_path / "sys-infiniband"
    for folder, names in ((devices, ["rdma_cm", "uverbs0", "uverbs1"]), (adapters, ["mlx5_0", "mlx5_1"])):
        folder.mkdir()
        for name in names:
            (folder / name).touch()
    env = {**CLUSTER_ENV, "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO"}
    ib, nccl, _ = check_interconnect(env, devices, adapters)
    assert (ib.level, ib.found) == ("ok", f"mlx5_0, mlx5_1 (rdma_cm, uverbs0, uverbs1 in {devices})")
    assert nccl.found == "NCCL_DEBUG=INFO, NCCL_IB_HCA=mlx5_0,mlx5_1" and "every host" in nccl.advice
    ib, _, _ = check_interconnect({**env, "NCCL_IB_DISABLE": "1"}, devices, adapters)
    assert ib.level == "warn" and "NCCL_IB_DISABLE=1" in ib.advice


def test_a_cluster_without_infiniband_or_socket_interface_is_warned(tmp_path):
    none = tmp_path / "none"
    ib, nccl, _ = check_interconnect(CLUSTER_ENV, none, none)
    assert ib.level == "warn" and "NCCL_SOCKET_IFNAME" in ib.advice
    assert nccl.found.startswith("none set")
    ib, _, _ = check_interconnect({**CLUSTER_ENV, "NCCL_SOCKET_IFNAME": "eth0"}, none, none)
    assert ib.level == "ok" and "TCP over eth0" in ib.found
    ib, _, _ = check_interconnect({**CLUSTER_ENV, "NCCL_NET": "IB"}, none, none)
    assert ib.level == "FAIL" and "unset NCCL_NET" in ib.advice
    rows = check_interconnect({}, none, none)      # one host: nothing to warn about, no SSH row
    assert [(r.name, r.level) for r in rows] == [("InfiniBand", "ok"), ("NCCL variables", "ok")]


def test_cluster_ssh_row_names_the_host_whose_port_does_not_answer(tmp_path):
    from tests.support.sshd import cluster_ssh_config, free_port, start_sshd

    server = start_sshd(tmp_path / "sshd")
    try:
        config = cluster_ssh_config(tmp_path / "ssh_config", {"sub1": server.port, "sub2": free_port()},
                                    server.key, tmp_path / "known_hosts")
        env = {**CLUSTER_ENV, "BACKENDAI_CLUSTER_HOSTS": "main1,sub1,sub2", "BACKENDAI_CLUSTER_SIZE": "3",
               "MLPERF_SSH_CONFIG": str(config)}
        *_, row = check_interconnect(env, tmp_path, tmp_path)
        assert row.name == "cluster SSH" and row.level == "warn"
        assert row.found.startswith("sub2: 127.0.0.1:") and "sub1" not in row.found
        config.write_text(config.read_text().split("\nHost sub2")[0])
        *_, row = check_interconnect({**env, "BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_SIZE": "2"},
                                     tmp_path, tmp_path)
        assert row.level == "ok" and row.found.startswith("sub1 answer")
    finally:
        server.stop()


def make_libcuda(folder, version: str):
    """A libcuda.so.1 -> libcuda.so.<version> pair, as the driver and the cuda-compat package lay them out."""
    folder.mkdir(parents=True)
    (folder / f"libcuda.so.{version}").write_bytes(b"")
    (folder / "libcuda.so.1").symlink_to(f"libcuda.so.{version}")
    return folder


def test_an_older_forward_compat_libcuda_first_on_the_path_fails(tmp_path):
    """Seen on the H200 machine: /usr/local/cuda/compat's libcuda 580.95.05 put before driver
    580.159.04 made every CUDA call fail with error 803."""
    from mlperf.doctor import _compat_libcuda_row

    old = make_libcuda(tmp_path / "cuda" / "compat" / "lib", "580.95.05")
    new = make_libcuda(tmp_path / "cuda-13" / "compat" / "lib", "610.43.02")
    driver = make_libcuda(tmp_path / "nvidia" / "lib64", "580.159.04")
    [row] = _compat_libcuda_row("580.159.04", f"{tmp_path}/missing:{old}:{driver}")
    assert row.level == "FAIL" and "libcuda 580.95.05" in row.found and "error 803" in row.advice
    assert f"LD_LIBRARY_PATH#{old}:" in row.advice
    assert _compat_libcuda_row("580.159.04", f"{new}:{driver}") == []      # forward compat, as meant
    assert _compat_libcuda_row("580.159.04", f"{driver}:{old}") == []      # the driver's own comes first
    assert _compat_libcuda_row("535.104.05", f"{old}:{driver}") == []      # an older driver: what compat is for
