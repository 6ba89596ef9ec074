"""`invoke fetch` against a real HTTP server on 127.0.0.1 that injects faults (tests/support/http_server.py)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from mlperf.datasets import extract as extracting
from mlperf.datasets import transfer
from mlperf.errors import UserError
from tests.conftest import ROOT, run_invoke
from tests.support.http_server import Faults, FileServer, free_port, make_file

FAST_RETRY = {"MLPERF_FETCH_BACKOFF": "0.01", "MLPERF_FETCH_RETRIES": "3"}
SIZE = 3_000_000  # not a multiple of any read size, so drops land mid-chunk


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_manifest(path: Path, files: list[dict], name: str = "mini", **extra) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"name": name, "files": files, **extra}, sort_keys=False))
    return path


def entry(srv: FileServer, name: str, data: bytes, **over) -> dict:
    return {"name": name, "url": srv.url(name), "md5": md5(data), "size": len(data), **over}


def fetch(manifest: Path, data: Path, *extra: str, env: dict | None = None):
    return run_invoke(["fetch", "--manifest", str(manifest), "--data-dir", str(data), *extra],
                      env={**FAST_RETRY, **(env or {})})


class Link(str):
    """An archive member that is a symbolic link to this target (in a zip: create_system 3, S_IFLNK)."""


def zip_bytes(members: dict[str, bytes | Link], links: dict[str, str] | None = None) -> bytes:
    """A zip of `members` in order (then `links`), as an attacker or a packer would write it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in {**members, **{n: Link(t) for n, t in (links or {}).items()}}.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if isinstance(content, Link):
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, content)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes | Link]) -> bytes:
    """A tar of `members` in order; a Link is a symbolic link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, Link):
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture
def served(tmp_path):
    """A folder the server serves, with one random file `blob.bin`."""
    folder = tmp_path / "srv"
    folder.mkdir()
    return folder, make_file(folder / "blob.bin", SIZE)


def test_dropped_connection_resumes_with_range(tmp_path, served):
    folder, data = served
    with FileServer(folder, {"blob.bin": Faults(drop_after=[1_000_003])}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        proc = fetch(manifest, tmp_path / "data")
        assert proc.returncode == 0, proc.stderr
        assert [(r.status, r.range) for r in srv.requests] == [(200, None), (206, "bytes=1000003-")]
        assert srv.bytes_sent == SIZE  # nothing sent twice
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data
    assert not (tmp_path / "data/mini/downloads/blob.bin.part").exists()


def test_503_twice_then_success(tmp_path, served):
    folder, data = served
    with FileServer(folder, {"blob.bin": Faults(statuses=[503, 503])}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        proc = fetch(manifest, tmp_path / "data")
        assert proc.returncode == 0, proc.stderr
        assert [r.status for r in srv.requests] == [503, 503, 200]
        assert "HTTP 503" in proc.stdout and "retry 2 of 3" in proc.stdout
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data


def test_persistent_5xx_gives_up_with_one_line(tmp_path, served):
    folder, data = served
    with FileServer(folder, {"blob.bin": Faults(statuses=[500] * 10)}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        proc = fetch(manifest, tmp_path / "data")
        assert len(srv.requests) == 4  # the first try and 3 retries (MLPERF_FETCH_RETRIES)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "cannot download blob.bin" in proc.stderr and "HTTP 500" in proc.stderr


def test_server_without_range_support_restarts_cleanly(tmp_path, served):
    folder, data = served
    with FileServer(folder, {"blob.bin": Faults(drop_after=[1_000_003], ranges=False)}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        proc = fetch(manifest, tmp_path / "data")
        assert proc.returncode == 0, proc.stderr
        # It asked to resume, got the whole file (200), and wrote it from the start.
        assert [(r.status, r.range) for r in srv.requests] == [(200, None), (200, "bytes=1000003-")]
        assert "starting over" in proc.stdout
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data


@pytest.mark.slow
def test_killed_download_resumes_without_sending_bytes_again(tmp_path, served):
    folder, data = served
    slow = Faults(rate=2_000_000)
    with FileServer(folder, {"blob.bin": slow}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        part = tmp_path / "data/mini/downloads/blob.bin.part"
        cmd = [sys.executable, "-m", "invoke", "fetch", "--manifest", str(manifest),
               "--data-dir", str(tmp_path / "data")]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (part.is_file() and part.stat().st_size >= SIZE // 3):
            assert time.monotonic() < deadline and proc.poll() is None, "download did not start"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        kept = part.stat().st_size
        assert 0 < kept < SIZE and not (tmp_path / "data/mini/downloads/blob.bin").exists()

        slow.rate = None
        srv.reset()
        again = fetch(manifest, tmp_path / "data")
        assert again.returncode == 0, again.stderr
        assert srv.requests[0].range == f"bytes={kept}-" and srv.requests[0].status == 206
        assert srv.bytes_sent == SIZE - kept < SIZE
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data


def test_wrong_checksum_is_retried_once_then_fails_naming_both(tmp_path, served):
    folder, data = served
    with FileServer(folder) as srv:
        wrong = "0" * 32
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data, md5=wrong)])
        proc = fetch(manifest, tmp_path / "data")
        assert [r.status for r in srv.requests] == [200, 200]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "blob.bin" in line and wrong in line and md5(data) in line
    assert list((tmp_path / "data/mini/downloads").glob("blob.bin*")) == []


def test_archives_are_extracted_once_and_second_run_transfers_nothing(tmp_path, served):
    folder, data = served
    archive = zip_bytes({"train/a.jpg": b"a" * 100, "train/b.jpg": b"b" * 50, "annotations/x.json": b"{}"})
    (folder / "set.zip").write_bytes(archive)
    other = make_file(folder / "other.bin", 123_457, seed=1)
    with FileServer(folder) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [
            entry(srv, "blob.bin", data), entry(srv, "set.zip", archive, extract=True),
            entry(srv, "other.bin", other)])
        first = fetch(manifest, tmp_path / "data", "--jobs", "3")
        assert first.returncode == 0, first.stderr
        assert sorted(r.path for r in srv.requests) == ["blob.bin", "other.bin", "set.zip"]
        root = tmp_path / "data/mini"
        assert (root / "train/a.jpg").read_bytes() == b"a" * 100
        assert (root / "annotations/x.json").read_bytes() == b"{}"
        assert not list(root.glob(".extract-*"))
        extracted = (root / "train/a.jpg").stat()

        srv.reset()
        second = fetch(manifest, tmp_path / "data")
        assert second.returncode == 0, second.stderr
        assert srv.requests == [] and "nothing to do" in second.stdout
        assert (root / "train/a.jpg").stat().st_ino == extracted.st_ino  # not unpacked again
    assert (root / "downloads/blob.bin").read_bytes() == data
    assert (root / "downloads/other.bin").read_bytes() == other
    assert (root / "downloads/set.zip").read_bytes() == archive


def test_zip_slip_archive_is_refused_and_nothing_lands_outside(tmp_path, served):
    folder, _ = served
    evil = zip_bytes({"ok.txt": b"fine", "../../escaped.txt": b"owned"})
    (folder / "evil.zip").write_bytes(evil)
    with FileServer(folder) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "evil.zip", evil, extract=True)])
        proc = fetch(manifest, tmp_path / "data")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refusing to extract evil.zip" in proc.stderr and "'..'" in proc.stderr
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("ok.txt"))


def test_too_little_disk_space_stops_before_any_download(tmp_path, served):
    folder, data = served
    with FileServer(folder) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data, size=10**15)])
        proc = fetch(manifest, tmp_path / "data")
        assert srv.requests == []
    assert proc.returncode == 1
    assert "not enough free disk space" in proc.stderr and "need 909.5 TiB" in proc.stderr
    assert "free" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_source_folder_is_used_instead_of_the_network(tmp_path, served):
    folder, data = served
    manifest = write_manifest(tmp_path / "m.yaml", [
        {"name": "blob.bin", "url": f"http://127.0.0.1:{free_port()}/blob.bin", "md5": md5(data)}])
    proc = fetch(manifest, tmp_path / "data", "--source", str(folder))
    assert proc.returncode == 0, proc.stderr
    got = tmp_path / "data/mini/downloads/blob.bin"
    assert got.read_bytes() == data
    assert got.stat().st_ino == (folder / "blob.bin").stat().st_ino  # hard-linked, not copied

    bad = write_manifest(tmp_path / "bad.yaml", [{"name": "blob.bin", "url": "http://x/", "md5": "1" * 32}],
                         name="other")
    proc = fetch(bad, tmp_path / "data", "--source", str(folder))
    assert proc.returncode == 1 and "1" * 32 in proc.stderr and md5(data) in proc.stderr
    assert (folder / "blob.bin").read_bytes() == data  # the user's own file is left alone


@pytest.mark.slow
def test_mirror_replaces_the_base_url(tmp_path, served):
    folder, data = served
    dead = f"http://127.0.0.1:{free_port()}"
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "blob.bin", "url": f"{dead}/blob.bin",
                                                     "md5": md5(data)}])
    with FileServer(folder) as srv:
        proc = fetch(manifest, tmp_path / "data", "--mirror", srv.url())
        assert proc.returncode == 0, proc.stderr
        assert [r.path for r in srv.requests] == ["blob.bin"]
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data

    proc = fetch(manifest, tmp_path / "data2", "--mirror", dead)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "connection refused" in proc.stderr


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """One dataset fetched for real, copied by the tests that must show it survives bad input."""
    tmp = tmp_path_factory.mktemp("fetched")
    (tmp / "srv").mkdir()
    data = make_file(tmp / "srv/blob.bin", SIZE)
    with FileServer(tmp / "srv") as srv:
        good = write_manifest(tmp / "good.yaml", [entry(srv, "blob.bin", data)])
        assert fetch(good, tmp / "data").returncode == 0
    return tmp / "data", data


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown dataset", "bad yaml", "missing md5", "data dir not writable"])
def test_bad_input_is_one_line_and_keeps_verified_data(tmp_path, fetched, case):
    shutil.copytree(fetched[0], tmp_path / "data", copy_function=shutil.copy2)
    data = fetched[1]
    verified = tmp_path / "data/mini/downloads/blob.bin"
    data_dir = tmp_path / "data"
    if case == "unknown dataset":
        proc = run_invoke(["fetch", "--dataset", "nope", "--data-dir", str(data_dir)])
        expected = "unknown dataset 'nope'"
    else:
        manifest = tmp_path / "m.yaml"
        if case == "bad yaml":
            manifest.write_text("name: mini\nfiles: [\n")
            expected = "not valid YAML"
        elif case == "missing md5":
            write_manifest(manifest, [{"name": "blob.bin", "url": "http://127.0.0.1/blob.bin"}])
            expected = "lacks 'md5'"
        else:
            write_manifest(manifest, [{"name": "blob.bin", "url": "http://127.0.0.1/x", "md5": md5(data)}])
            data_dir = verified  # a file: nothing can be created under it, even as root
            expected = "is not writable"
        proc = fetch(manifest, data_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and expected in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert verified.read_bytes() == data


def test_shapes_are_made_locally_and_verify(tmp_path):
    manifest = write_manifest(tmp_path / "shapes.yaml", [], name="tinyshapes", generator="shapes",
                              generator_options={"train_images": 6, "val_images": 3, "image_size": 64,
                                                 "seed": 1},
                              categories=3, splits={
                                  "train": {"images": "train2017", "count": 6,
                                            "annotations": "annotations/instances_train2017.json"},
                                  "val": {"images": "val2017", "count": 3,
                                          "annotations": "annotations/instances_val2017.json"}})
    dead_proxy = {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = fetch(manifest, tmp_path / "data", env=dead_proxy)  # no network needed
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "data/tinyshapes/train2017").glob("*.jpg"))) == 6
    check = run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(tmp_path / "data"), "--deep"])
    assert check.returncode == 0, check.stdout + check.stderr
    assert "train images (instances_train2017.json)" in check.stdout


# ---------------------------------------------------------------- units: the subtle parts

def test_backoff_is_exponential_jittered_and_capped():
    policy = transfer.RetryPolicy(retries=10, base=0.5, cap=8.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 8]
    assert [policy.delay(n, rng=lambda: 0.0) for n in range(1, 7)] == [0.25, 0.5, 1, 2, 4, 4]
    assert all(0.25 <= policy.delay(n) <= 8.0 for n in range(1, 50))


@pytest.mark.parametrize("name, target, reason", [
    ("a/b.jpg", None, None),
    ("/etc/passwd", None, "absolute path"),
    ("C:/x", None, "absolute path"),
    ("a/../../x", None, "'..' in path"),
    ("a\\..\\x", None, "backslash in path"),
    ("a/link", "../b", None),                 # stays inside: a/../b is b
    ("a/link", "../../b", "outside"),
    ("link", "/etc", "absolute path"),
    ("a/./b//c", None, None),                 # spelt oddly, still a/b/c
    ("a/link", "x/../../b", "after a folder"),  # x may be a link: climbing after it is refused
    ("a/link", "..", None),                   # the archive root itself
    ("nul\0x", None, "NUL"),
])
def test_unsafe_entries(name, target, reason):
    got = extracting.unsafe_reason(name, target)
    assert (got is None) if reason is None else (reason in got)


def test_zip_symlink_out_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"first.txt": b"x"}, links={"dir/link": "../../outside"}))
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="link to '../../outside'"):
        extracting.extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_tar_extraction_and_tar_link_escape(tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        payload = b"hello"
        info = tarfile.TarInfo("d/file.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("d/alias")
        link.type, link.linkname = tarfile.SYMTYPE, "file.txt"
        tf.addfile(link)
    dest = tmp_path / "dest"
    assert extracting.extract(good, dest) == ["d"]
    assert (dest / "d/alias").read_bytes() == b"hello"

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        link = tarfile.TarInfo("d/up")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
        tf.addfile(link)
    with pytest.raises(UserError, match="outside the destination"):
        extracting.extract(evil, tmp_path / "dest2")
    assert list((tmp_path / "dest2").iterdir()) == []


def test_killed_extraction_leaves_no_complete_looking_tree(tmp_path, monkeypatch):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({f"imgs/{i}.jpg": b"x" for i in range(5)}))
    dest = tmp_path / "dest"
    calls = []

    def dying_copy(src, dst, length=0):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-way
        dst.write(src.read())

    monkeypatch.setattr(extracting.shutil, "copyfileobj", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        extracting.extract(archive, dest)
    assert not (dest / "imgs").exists()
    monkeypatch.undo()
    assert extracting.extract(archive, dest) == ["imgs"]
    assert len(list((dest / "imgs").iterdir())) == 5


def test_plain_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(transfer, "PROGRESS_INTERVAL", 0.0)
    progress = transfer.Progress(total=4 << 20, jobs=2, stream=io.StringIO())
    progress.begin("a.zip", 4 << 20)
    progress.advance("a.zip", 1 << 20)
    progress.end("a.zip")
    out = capsys.readouterr().out
    assert "fetch: 1.0 MiB of 4.0 MiB (25%) at" in out and "ETA" in out and "a.zip 25%" in out


def test_state_file_is_valid_json_after_fetch(tmp_path, served):
    folder, data = served
    with FileServer(folder) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        assert fetch(manifest, tmp_path / "data").returncode == 0
    state = json.loads((tmp_path / "data/mini/downloads/.state.json").read_text())
    got = tmp_path / "data/mini/downloads/blob.bin"
    assert state["files"]["blob.bin"] == {"algo": "md5", "digest": md5(data),
                                          "stat": [got.stat().st_size, got.stat().st_mtime_ns]}


@pytest.mark.slow
def test_archive_deleted_after_extraction_is_not_fetched_again(tmp_path, served):
    folder, _ = served
    archive = zip_bytes({"imgs/a.jpg": b"a" * 10})
    (folder / "set.zip").write_bytes(archive)
    with FileServer(folder) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "set.zip", archive, extract=True)])
        assert fetch(manifest, tmp_path / "data").returncode == 0
        (tmp_path / "data/mini/downloads/set.zip").unlink()  # a user freeing space
        srv.reset()
        again = fetch(manifest, tmp_path / "data")
        assert again.returncode == 0 and srv.requests == [] and "nothing to do" in again.stdout
        check = run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(tmp_path / "data")])
        assert check.returncode == 0 and "archive since deleted" in check.stdout
        shutil.rmtree(tmp_path / "data/mini/imgs")  # the unpacked tree gone too: fetch again
        third = fetch(manifest, tmp_path / "data")
        assert third.returncode == 0 and [r.path for r in srv.requests] == ["set.zip"]
    assert (tmp_path / "data/mini/imgs/a.jpg").read_bytes() == b"a" * 10
