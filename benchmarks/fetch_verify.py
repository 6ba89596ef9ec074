"""`invoke fetch` against `curl -o`, and `invoke verify` against `md5sum -c`, side by side on loopback.

    .venv/bin/python -m benchmarks.fetch_verify [--workdir /tmp] [--repeats 3]

Fetch: one 1 GiB file from the sendfile-based server in tests/support/http_server.py (the same server for
both clients), fresh destination each time. `curl -o` neither hashes nor checks; `curl -o && md5sum`
is what the reference download + verify scripts do, shown for context. Verify: three files, 2 GiB in
all, from the page cache (read once before timing), `invoke verify --force` (hashing every file)
against `md5sum -c`; once with a mixed set (1 GiB + 2 x 512 MiB), once with equal thirds. Runs
alternate and repeat; medians are reported. Commands are timed as a user types them (wall clock,
interpreter start included). JSON goes to benchmarks/results/fetch_verify-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlperf import PROJECT_ROOT as ROOT
from tests.support.http_server import FileServer, Faults

MiB = 1 << 20
GiB = 1 << 30


def write_random(path: Path, size: int, seed: int) -> str:
    """Random (incompressible) bytes, fast: one 64 MiB random block, varied per block; returns md5."""
    import random

    block = random.Random(seed).randbytes(64 * MiB)
    h = hashlib.md5()
    with open(path, "wb") as fh:
        for i in range(size // len(block)):
            chunk = i.to_bytes(8, "little") + block[8:]
            fh.write(chunk)
            h.update(chunk)
        rest = block[: size % len(block)]
        fh.write(rest)
        h.update(rest)
    return h.hexdigest()


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def manifest(path: Path, name: str, files: list[tuple[str, str, int, str]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"name": name, "files": [
        {"name": n, "url": u, "md5": m, "size": s} for n, u, s, m in files]}))
    return path


def bench_fetch(work: Path, repeats: int, rate: float | None = None) -> dict:
    """1 GiB through `invoke fetch` and curl; `rate` (bytes/s) paces the server like a network link."""
    served = work / "served"
    served.mkdir(exist_ok=True)
    if not (served / "big.bin").exists():
        write_random(served / "big.bin", GiB, seed=1)
    digest = hashlib.md5((served / "big.bin").read_bytes()).hexdigest()
    invoke = [sys.executable, "-m", "invoke"]
    times: dict[str, list[float]] = {"invoke fetch": [], "curl -o": [], "curl -o && md5sum": []}
    faults = {"big.bin": Faults(rate=rate)} if rate else None
    with FileServer(served, faults) as srv:
        m = manifest(work / "fetch.yaml", "bench", [("big.bin", srv.url("big.bin"), GiB, digest)])
        for _ in range(repeats):
            for label in times:
                dest = work / "dest"
                dest.mkdir()
                if label == "invoke fetch":
                    t = timed(invoke + ["fetch", "--manifest", str(m), "--data-dir", str(dest)], cwd=ROOT)
                    got = dest / "bench/downloads/big.bin"
                else:
                    got = dest / "big.bin"
                    cmd = f"curl -sS -o {got} {srv.url('big.bin')}"
                    if "md5sum" in label:
                        cmd += f" && md5sum {got}"
                    t = timed(["bash", "-c", cmd])
                assert got.stat().st_size == GiB
                times[label].append(t)
                shutil.rmtree(dest)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bytes": GiB, "server_rate_MiB_s": rate / MiB if rate else None, "times_s": times, "median_s": med,
        "rate_MiB_s": {k: GiB / MiB / v for k, v in med.items()},
        "ratio_rate_invoke_vs_curl": med["curl -o"] / med["invoke fetch"],
        "ratio_rate_invoke_vs_curl_md5sum": med["curl -o && md5sum"] / med["invoke fetch"],
    }


def md5_rate(path: Path) -> float:
    """hashlib md5 on one core from memory: the ceiling of any fetch that hashes while it downloads."""
    data = path.read_bytes()
    start = time.perf_counter()
    hashlib.md5(data)
    return len(data) / MiB / (time.perf_counter() - start)


def bench_verify(work: Path, repeats: int, sizes: list[int], label: str) -> dict:
    folder = work / f"verify-{label}"
    downloads = folder / "data/bench/downloads"
    downloads.mkdir(parents=True)
    files = []
    for i, size in enumerate(sizes):
        name = f"part{i}.bin"
        files.append((name, f"http://127.0.0.1/{name}", size, write_random(downloads / name, size, seed=10 + i)))
    m = manifest(folder / "verify.yaml", "bench", files)
    (downloads / "hashes.md5").write_text("".join(f"{md5}  {name}\n" for name, _, _, md5 in files))
    for name, *_ in files:  # into the page cache: both tools then measure hashing, not the disk
        subprocess.run(["cat", str(downloads / name)], stdout=subprocess.DEVNULL, check=True)
    times: dict[str, list[float]] = {"invoke verify --force": [], "md5sum -c": []}
    for _ in range(repeats):
        times["invoke verify --force"].append(timed(
            [sys.executable, "-m", "invoke", "verify", "--manifest", str(m), "--data-dir",
             str(folder / "data"), "--force"], cwd=ROOT))
        times["md5sum -c"].append(timed(["md5sum", "-c", "--quiet", "hashes.md5"], cwd=downloads))

    from mlperf.datasets.hashing import hash_files  # the same function, in this process: no start-up

    in_process = []
    for _ in range(repeats):
        start = time.perf_counter()
        hash_files([(downloads / n, "md5") for n, *_ in files])
        in_process.append(time.perf_counter() - start)
    shutil.rmtree(folder)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"sizes_bytes": sizes, "times_s": times, "median_s": med,
            "speedup_invoke_vs_md5sum": med["md5sum -c"] / med["invoke verify --force"],
            "hash_files_in_process_median_s": statistics.median(in_process)}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
            "curl": subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
            "md5sum": subprocess.run(["md5sum", "--version"], capture_output=True, text=True).stdout.split("\n")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="scratch folder (needs ~4 GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions (median taken)")
    parser.add_argument("--out", help="JSON result path (default benchmarks/results/fetch_verify-<date>.json)")
    args = parser.parse_args()
    free = shutil.disk_usage(args.workdir).free
    if free < 5 * GiB:
        sys.exit(f"error: {args.workdir} has {free / GiB:.1f} GiB free; the benchmark needs 5 GiB")
    work = Path(tempfile.mkdtemp(prefix="fetch-verify-", dir=args.workdir))
    try:
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.fetch_verify " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "fetch": bench_fetch(work, args.repeats),
            # a link slower than md5 on one core (~570 MiB/s here): 200 MiB/s is about 1.7 Gbit/s
            "fetch_200MiB_s_link": bench_fetch(work, args.repeats, rate=200 * MiB),
            "md5_one_core_MiB_s": md5_rate(work / "served/big.bin"),
            "verify_mixed": bench_verify(work, args.repeats, [GiB, GiB // 2, GiB // 2], "mixed"),
            "verify_thirds": bench_verify(work, args.repeats, [2 * GiB // 3] * 2 + [2 * GiB - 2 * (2 * GiB // 3)],
                                          "thirds"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_at_end"] = os.getloadavg()  # other work on the host skews the ratios: shown
    out = Path(args.out or ROOT / "benchmarks/results" / f"fetch_verify-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("fetch", "fetch_200MiB_s_link"):
        f = result[key]
        print(f"{key} 1 GiB: invoke {f['rate_MiB_s']['invoke fetch']:.0f} MiB/s, curl -o "
              f"{f['rate_MiB_s']['curl -o']:.0f} MiB/s (ratio {f['ratio_rate_invoke_vs_curl']:.2f}), "
              f"curl -o && md5sum {f['rate_MiB_s']['curl -o && md5sum']:.0f} MiB/s "
              f"(ratio {f['ratio_rate_invoke_vs_curl_md5sum']:.2f})")
    print(f"md5 on one core: {result['md5_one_core_MiB_s']:.0f} MiB/s")
    for key in ("verify_mixed", "verify_thirds"):
        v = result[key]
        print(f"{key}: invoke {v['median_s']['invoke verify --force']:.2f}s, md5sum -c "
              f"{v['median_s']['md5sum -c']:.2f}s, speedup {v['speedup_invoke_vs_md5sum']:.2f}x; "
              f"hash_files in process {v['hash_files_in_process_median_s']:.2f}s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
