"""`invoke fetch` against hostile or broken input: archives that try to write outside the dataset or
over fetch's own files, servers that send too much, too slowly or redirect badly, full disks, two
fetches at once, secrets in URLs, and malformed manifests and settings. Every case must end in one
`error:` line and exit code 1, with nothing written outside and nothing verified lost."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlperf.datasets import extract as extracting
from mlperf.datasets import transfer
from mlperf.datasets import load_manifest, redact_url
from mlperf.errors import UserError
from test_fetch import SIZE, Link, entry, fetch, md5, tar_bytes, write_manifest, zip_bytes
from conftest import ROOT, one_error_line, run_invoke
from tests.support.http_server import Faults, FileServer, make_file

DEEP = "/".join(f"d{i}" for i in range(1, 13))  # d1/d2/.../d12


def links_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_symlink()]


def link_chain(victim: str) -> dict:
    """The link-chain escape: `l` points 3 folders up, so `l/evil` lies at d9/evil on disk, 12
    folders up from which (the data dir's parent, here) the target climbs; then a file spelt
    `l/./evil`, written with open(), which follows the link."""
    return {f"{DEEP}/l": Link("../../.."), f"{DEEP}/l/evil": Link("../" * 12 + victim),
            f"{DEEP}/l/./evil": b"owned\n"}


def test_zip_link_chain_cannot_write_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/evil.zip").write_bytes(zip_bytes(link_chain(victim.name)))
    with FileServer(tmp_path / "srv") as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "evil.zip", (tmp_path / "srv/evil.zip")
                                                              .read_bytes(), extract=True)])
        err = one_error_line(fetch(manifest, tmp_path / "data"))
    assert "refusing to extract evil.zip" in err and "nothing was written" in err
    assert victim.read_text() == "original\n"
    assert links_under(tmp_path / "data") == [] and not (tmp_path / "data/mini/d1").exists()


def test_tar_link_chain_cannot_write_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_bytes(link_chain(victim.name)))
    with pytest.raises(UserError, match="refusing to extract evil.tar"):
        extracting.extract(archive, tmp_path / "data/mini")
    assert victim.read_text() == "original\n" and links_under(tmp_path / "data") == []


def test_no_write_follows_a_link_even_one_the_name_checks_missed(tmp_path):
    """The second guard alone: a link already in the tree (as a case-insensitive disk could make
    of `L` and `l/x`) is never written through; the write fails instead."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a").symlink_to(outside)
    tree = extracting._Tree(root)
    try:
        file = extracting.Entry("a/x", ("a", "x"), "file", None, 1, None)
        with pytest.raises(OSError):
            tree.put(file, lambda _: io.BytesIO(b"x"))
    finally:
        tree.close()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("members, reason", [
    ({"a": b"file", "a/b": b"below a file"}, "is a file in the archive, not a folder"),
    ({"x/l": Link("."), "x/l/f": b"through a link"}, "is a link in the archive"),
    ({"a/b": b"1", "a//./b": b"2"}, "listed twice"),
])
def test_zip_entries_that_clash_are_refused(tmp_path, members, reason):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes(members))
    with pytest.raises(UserError, match=reason):
        extracting.extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("name", ["downloads/readme.txt", ".verified.json", ".extract-x.zip.tmp/a"])
def test_archive_cannot_replace_the_tools_own_files(tmp_path, name):
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    data = make_file(srv_dir / "blob.bin", 1000)
    evil = zip_bytes({"ok/a.txt": b"a", name: b"x"})
    (srv_dir / "evil.zip").write_bytes(evil)
    with FileServer(srv_dir) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data),
                                                        entry(srv, "evil.zip", evil, extract=True)])
        err = one_error_line(fetch(manifest, tmp_path / "data", "--jobs", "1"))
    assert "is reserved for fetch's own files" in err
    downloads = tmp_path / "data/mini/downloads"
    assert (downloads / "blob.bin").read_bytes() == data and (downloads / "evil.zip").read_bytes() == evil
    assert json.loads((downloads / ".state.json").read_text())["files"]["blob.bin"]["digest"] == md5(data)
    assert not (tmp_path / "data/mini/ok").exists()


def test_archives_that_share_a_folder_are_refused_naming_both(tmp_path):
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    a, b = zip_bytes({"common/a.txt": b"a"}), zip_bytes({"common/b.txt": b"b"})
    (srv_dir / "a.zip").write_bytes(a)
    (srv_dir / "b.zip").write_bytes(b)
    with FileServer(srv_dir) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "a.zip", a, extract=True),
                                                        entry(srv, "b.zip", b, extract=True)])
        err = one_error_line(fetch(manifest, tmp_path / "data", "--jobs", "4"))
        again = one_error_line(fetch(manifest, tmp_path / "data"))  # not "nothing to do"
    assert "a.zip" in err and "b.zip" in err and "both unpack to 'common'" in err
    assert "both unpack to 'common'" in again
    assert len(list((tmp_path / "data/mini/common").iterdir())) == 1  # one archive, whole; not a mix
    check = run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(tmp_path / "data")])
    assert "is not unpacked" in one_error_line(check)


def test_two_fetches_at_once_the_second_stops_and_the_first_finishes(tmp_path):
    (tmp_path / "srv").mkdir()
    data = make_file(tmp_path / "srv/blob.bin", SIZE)
    slow = Faults(rate=1_000_000)
    with FileServer(tmp_path / "srv", {"blob.bin": slow}) as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        part = tmp_path / "data/mini/downloads/blob.bin.part"
        first = subprocess.Popen([sys.executable, "-m", "invoke", "fetch", "--manifest", str(manifest),
                                  "--data-dir", str(tmp_path / "data")], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (part.is_file() and part.stat().st_size > 0):
            assert time.monotonic() < deadline and first.poll() is None, "first fetch did not start"
            time.sleep(0.02)
        err = one_error_line(fetch(manifest, tmp_path / "data"))
        slow.rate = None
        out, stderr = first.communicate(timeout=60)
    assert f"another fetch of mini is running (pid {first.pid})" in err
    assert first.returncode == 0, stderr
    assert (tmp_path / "data/mini/downloads/blob.bin").read_bytes() == data
    assert [r.path for r in srv.requests] == ["blob.bin"]  # the second one asked nothing


@pytest.mark.slow
@pytest.mark.parametrize("length", [True, False])
def test_download_stops_at_the_manifest_size(tmp_path, length):
    """30 MiB served for a 300 kB file: refused from the Content-Length, or cut at 300 kB + 1."""
    (tmp_path / "srv").mkdir()
    make_file(tmp_path / "srv/blob.bin", 30 << 20)
    with FileServer(tmp_path / "srv", {"blob.bin": Faults(length=length)}) as srv:
        spec = {"name": "blob.bin", "url": srv.url("blob.bin"), "md5": "0" * 32, "size": 300_000}
        err = one_error_line(fetch(write_manifest(tmp_path / "m.yaml", [spec]), tmp_path / "data"))
    assert ("Content-Length" in err) if length else ("sent more than the manifest's 300000 bytes" in err)
    assert sum(p.stat().st_size for p in (tmp_path / "data/mini/downloads").glob("blob.bin*")) <= 300_000


@pytest.mark.slow
def test_a_trickle_is_retried_then_refused(tmp_path):
    (tmp_path / "srv").mkdir()
    data = make_file(tmp_path / "srv/blob.bin", 1000)
    with FileServer(tmp_path / "srv", {"blob.bin": Faults(rate=4)}) as srv:  # a byte every 0.25 s
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        began = time.monotonic()
        proc = fetch(manifest, tmp_path / "data", env={"MLPERF_FETCH_MIN_RATE": "100",
                                                       "MLPERF_FETCH_RATE_WINDOW": "0.6",
                                                       "MLPERF_FETCH_RETRIES": "1"})
        err = one_error_line(proc)
    assert "slower than 100 B/s over 0.6s" in err and "(2 attempts)" in err
    assert len(srv.requests) == 2 and time.monotonic() - began < 20


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs) at tmp_path/small, so a full disk is the kernel's own
    ENOSPC. Mounting needs root (this sandbox and CI run as root); elsewhere the test is skipped."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_while_downloading_is_one_line_and_keeps_the_part(tmp_path, small_disk):
    (tmp_path / "srv").mkdir()
    data = make_file(tmp_path / "srv/blob.bin", SIZE)
    with FileServer(tmp_path / "srv") as srv:
        spec = {"name": "blob.bin", "url": srv.url("blob.bin"), "md5": md5(data)}  # no size: no check first
        err = one_error_line(fetch(write_manifest(tmp_path / "m.yaml", [spec]), small_disk))
    part = small_disk / "mini/downloads/blob.bin.part"
    assert "No space left on device" in err and str(part) in err and "resumes" in err
    assert 0 < part.stat().st_size < SIZE and part.read_bytes() == data[:part.stat().st_size]


def test_full_disk_while_unpacking_is_one_line_and_leaves_no_half_tree(tmp_path, small_disk):
    """300 one-byte files: 300 bytes by the zip's directory, but a 4 KiB page each on tmpfs."""
    (tmp_path / "srv").mkdir()
    archive = zip_bytes({f"imgs/{i:04d}.jpg": b"x" for i in range(300)})
    (tmp_path / "srv/set.zip").write_bytes(archive)
    with FileServer(tmp_path / "srv") as srv:
        err = one_error_line(fetch(write_manifest(tmp_path / "m.yaml", [entry(srv, "set.zip", archive,
                                                                              extract=True)]), small_disk))
    assert "No space left on device" in err and "while unpacking set.zip" in err
    assert not (small_disk / "mini/imgs").exists() and not list((small_disk / "mini").glob(".extract-*"))
    assert (small_disk / "mini/downloads/set.zip").read_bytes() == archive  # checked, kept


@pytest.mark.slow
def test_unpacked_size_is_checked_against_free_space_before_unpacking(tmp_path, small_disk):
    """A 4 MiB file that deflates to a few kB passes the check made before the download (which can
    only guess from the archive's size); the zip's own directory stops it before writing."""
    (tmp_path / "srv").mkdir()
    archive = zip_bytes({"big/zeros.bin": bytes(4 << 20)})
    (tmp_path / "srv/set.zip").write_bytes(archive)
    with FileServer(tmp_path / "srv") as srv:
        err = one_error_line(fetch(write_manifest(tmp_path / "m.yaml", [entry(srv, "set.zip", archive,
                                                                              extract=True)]), small_disk))
    assert "not enough free disk space" in err and "to unpack set.zip: need 4.0 MiB" in err
    assert not (small_disk / "mini/big").exists()


@pytest.mark.parametrize("fault, reason", [
    (Faults(redirect="file:///etc/passwd"), "redirected to a URL that is not http(s)"),
    (Faults(redirect="/blob.bin"), "too many redirects"),
])
def test_bad_redirects_are_one_line(tmp_path, fault, reason):
    (tmp_path / "srv").mkdir()
    data = make_file(tmp_path / "srv/blob.bin", 100)
    with FileServer(tmp_path / "srv", {"blob.bin": fault}) as srv:
        err = one_error_line(fetch(write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)]),
                                   tmp_path / "data"))
    assert reason in err and "cannot download blob.bin" in err


@pytest.mark.slow
def test_secrets_in_urls_are_never_shown(tmp_path):
    (tmp_path / "srv").mkdir()
    with FileServer(tmp_path / "srv", {"gone.bin": Faults(statuses=[503])}) as srv:
        url = srv.url("gone.bin").replace("http://", "http://user:hunter2@") + "?token=s3cr3t&x=1"
        manifest = write_manifest(tmp_path / "m.yaml", [{"name": "gone.bin", "url": url, "md5": "0" * 32}])
        proc = fetch(manifest, tmp_path / "data")  # a 503, retried, then a 404
        err = one_error_line(proc)
    mirror_err = one_error_line(fetch(manifest, tmp_path / "data", "--mirror", "http://me:pw@[::1"))
    assert "retry 1 of 3" in proc.stdout
    assert "HTTP 404" in err and "http://***@127.0.0.1" in err and "token=***&x=***" in err
    assert "--mirror 'http://***@[::1' is malformed" in mirror_err
    for text in (err, mirror_err, proc.stdout):
        assert "hunter2" not in text and "s3cr3t" not in text and ":pw@" not in text


def test_redact_url_hides_userinfo_and_query_values_anywhere_in_a_string():
    assert redact_url("get https://u:p@h.example:8443/a/b?sig=abc&e=1#top: HTTP 403.") == \
        "get https://***@h.example:8443/a/b?sig=***&e=***#top: HTTP 403."
    assert redact_url("(s3://AKIA:KEY@bucket/x?X-Amz-Signature=zz), http://plain/x") == \
        "(s3://***@bucket/x?X-Amz-Signature=***), http://plain/x"
    assert redact_url("no url here: user:pass@host") == "no url here: user:pass@host"


BAD_MANIFESTS = [
    ("url: file:///etc/passwd", "is not an http:// or https:// URL"),
    ("url: ftp://example.org/x", "is not an http:// or https:// URL"),
    ("url: 'http://[::1'", "is malformed"),
    ("url: http://exa mple.com/x", "contains spaces"),
    ("url: 42", "is not a URL"),
    ("md5: 12345678901234567890123456789012", "is not 32 hex digits (write it in quotes"),
    ("extract: 'yes'", "extract must be true or false"),
    ("name: \"a\\0b\"", "NUL"),
    ("name: .state.json", "is reserved"),
    ("name: .extract-x.zip.tmp", "is reserved"),
    ("name: x.part", "is reserved"),
]


@pytest.mark.parametrize("field, message", BAD_MANIFESTS)
def test_malformed_file_entries_are_one_line(tmp_path, field, message):
    base = {"name": "name: blob.bin", "url": "url: http://127.0.0.1/blob.bin", "md5": f"md5: '{'0' * 32}'"}
    key = field.split(":")[0]
    lines = [field if k == key else v for k, v in base.items()] + ([field] if key not in base else [])
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: mini\nfiles:\n  - " + "\n    ".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        load_manifest(manifest)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    (b"name: mini\nfiles: []\nsplits: [train]\n", "'splits' must be a mapping"),
    (b"name: mini\nfiles: []\nsplits: {val: {images: v, annotations: a.json, count: many}}\n", "count must be"),
    (b"name: mini\nfiles: []\nsplits: {val: {images: ../../etc, annotations: a.json}}\n", "relative path"),
    (b"name: mini\nfiles: []\ncategories: '80'\n", "'categories' must be a whole number"),
    (b"name: mini\nfiles: []\n# caf\xe9\n", "is not UTF-8 text"),
])
def test_malformed_manifests_are_one_line(tmp_path, text, message):
    manifest = tmp_path / "m.yaml"
    manifest.write_bytes(text)
    with pytest.raises(UserError) as info:
        load_manifest(manifest)
    assert message in str(info.value)


def test_bad_jobs_and_settings_are_one_line_each(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "b", "url": "http://127.0.0.1:9/b", "md5": "0" * 32}])
    for jobs in ("abc", "0", "-1"):
        err = one_error_line(fetch(manifest, tmp_path / "data", f"--jobs={jobs}"))
        assert f"--jobs {jobs!r} is not a number" in err
    err = one_error_line(fetch(manifest, tmp_path / "data", env={"MLPERF_FETCH_BACKOFF": "-1"}))
    assert "MLPERF_FETCH_BACKOFF='-1'" in err
    for var, value in (("MLPERF_FETCH_RETRIES", "-3"), ("MLPERF_FETCH_RETRIES", "2.5"),
                       ("MLPERF_FETCH_BACKOFF", "nan"), ("MLPERF_FETCH_RATE_WINDOW", "0")):
        monkeypatch.setenv(var, value)
        with pytest.raises(UserError, match=var):
            transfer.RetryPolicy.from_env()
        monkeypatch.delenv(var)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ['{"files": []}', '{"files": {"blob.bin": "x"}, "extracted": 3}'])
def test_a_damaged_state_file_is_rechecked_not_trusted(tmp_path, damage):
    (tmp_path / "srv").mkdir()
    data = make_file(tmp_path / "srv/blob.bin", 1000)
    with FileServer(tmp_path / "srv") as srv:
        manifest = write_manifest(tmp_path / "m.yaml", [entry(srv, "blob.bin", data)])
        assert fetch(manifest, tmp_path / "data").returncode == 0
        state = tmp_path / "data/mini/downloads/.state.json"
        state.write_text(damage)
        srv.reset()
        again = fetch(manifest, tmp_path / "data")
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
        assert srv.requests == []  # hashed again from the disk, not downloaded again
    assert json.loads(state.read_text())["files"]["blob.bin"]["digest"] == md5(data)
