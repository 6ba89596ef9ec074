"""The published Mask R-CNN results of MLPerf Training v0.7 to v3.1, as data, and their logs on demand.

published_maskrcnn.json (beside this file) holds one entry per result folder of the public
mlcommons/training_results_vX repositories: round, submitter, system, accelerator model and count,
nodes, division, framework, the score this project's scorer finds in the logs, the published score
where a repository states one (a submitter's summary.csv), and each log's raw URL, size and sha256.
Logs are fetched through `invoke fetch`'s machinery (checksums, resume, a cache under the data
folder), never by a second downloader. `python -m mlperf.results.catalog --rebuild DIR ...` makes the
file again from local clones of those repositories (bare or checked out), so that it stays current.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from mlperf.errors import UserError
from mlperf.files import shown, write_json
from mlperf.results.logs import RESULT_NAME, parse_log
from mlperf.results.score import run_result, score
from object_detection.recipe import BENCHMARK

CATALOG = Path(__file__).with_name("published_maskrcnn.json")
RAW_BASE = "https://raw.githubusercontent.com"          # what --mirror stands in for
REPOSITORY = "mlcommons/training_results_v{round}"
ROUNDS = ("0.7", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1")  # every round with Mask R-CNN
CACHE = "published-maskrcnn"                             # <data_dir>/<CACHE>/<entry>/downloads/
PUBLISHED_TOLERANCE = 0.01                               # minutes: published tables round to two places
# Published scores the repositories do not state themselves, with where they are published.
STATED_ELSEWHERE = {
    "v3.0/NVIDIA/dgxh100_ngc23.04_pytorch": (19.18, "MLPerf ID 3.0-2064, NVIDIA's MLPerf Training v3.0 table"),
}


def load(path: Path = CATALOG) -> dict[str, dict]:
    """Catalog entries by id (e.g. v3.0/NVIDIA/dgxh100_ngc23.04_pytorch)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the catalog {path} cannot be read ({exc}): restore it from git, or rebuild it with "
                        "`python -m mlperf.results.catalog --rebuild DIR`") from None
    return {entry["id"]: entry for entry in doc["entries"]}


def entry(entry_id: str, entries: dict[str, dict] | None = None) -> dict:
    """The entry of `entry_id`, or a UserError that names the nearest ids."""
    entries = load() if entries is None else entries
    if entry_id in entries:
        return entries[entry_id]
    import difflib

    near = difflib.get_close_matches(entry_id, list(entries), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise UserError(f"--with {shown(entry_id)} is neither a folder nor a published result{hint}: give a folder of "
                    "result_*.txt or an id from `invoke compare --catalog`")


def accelerator_key(model: str) -> tuple[str, bool] | None:
    """(family, PCIe) of an accelerator name as submitters and nvidia-smi write it: "NVIDIA H100-SXM5-80GB"
    and "NVIDIA H100 80GB HBM3" are both ("H100", False); None when no family is named (a CPU)."""
    text = (model or "").upper()
    m = re.search(r"\b(GH200|[A-Z]{1,2}\d{2,3}[A-Z]?|TPU(?:[- ]?V\d+[A-Z]*)?|GAUDI\d*)\b", text)
    return (m.group(1).replace(" ", "-"), "PCIE" in text) if m else None


def pick(model: str, count: int, entries: dict[str, dict] | None = None, limit: int = 3) -> list[dict]:
    """The fastest published results of the same accelerator (family and form) and count; where none
    has that count, those of the nearest count; where no result has the accelerator, none. Results
    with the very same logs count once."""
    key = accelerator_key(model)
    entries = load() if entries is None else entries
    same = [e for e in entries.values() if e.get("score") is not None and key is not None
            and accelerator_key(e["accelerator"]) == key]
    if not same:
        return []
    nearest = min(abs(math.log(max(e["accelerators"], 1) / max(count, 1))) for e in same)
    chosen, seen = [], set()
    for e in sorted(same, key=lambda e: e["score"]):
        logs = tuple(sorted(log["sha256"] for log in e["logs"]))  # a later round may republish the same logs
        if abs(math.log(max(e["accelerators"], 1) / max(count, 1))) == nearest and logs not in seen:
            chosen.append(e)
            seen.add(logs)
    return chosen[:limit]


def cache_name(entry_id: str) -> str:
    """The entry's folder under <data_dir>/published-maskrcnn/: its id as one plain name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", entry_id).strip("-")


def fetch_logs(item: dict, data_dir: Path, *, mirror: str | None = None, source: Path | None = None) -> Path:
    """The entry's logs, downloaded (or linked from `source`, a folder holding clones named
    training_results_vX) and checked against their sha256 as `invoke fetch` does; returns their folder."""
    from mlperf.datasets import Dataset, FileSpec, url_problem
    from mlperf.datasets.fetch import fetch_dataset

    if mirror is not None and (problem := url_problem(mirror)) is not None:
        raise UserError(f"--mirror {shown(mirror)} {problem}: give the http(s) URL that serves what "
                        f"{RAW_BASE} does")
    base = (mirror or RAW_BASE).rstrip("/")
    files = tuple(FileSpec(name=log["name"], url=f"{base}/{raw_path(item, log['path'])}" if mirror else log["url"],
                           md5=None, sha256=log["sha256"], size=log["size"]) for log in item["logs"])
    ds = Dataset(name=cache_name(item["id"]), files=files, description=f"published result {item['id']}")
    local = None
    if source is not None:
        local = Path(source) / item["repository"].split("/")[-1] / Path(item["logs"][0]["path"]).parent
        if not local.is_dir():
            raise UserError(f"--source {source} has no {local.relative_to(source)}: put a checkout of "
                            f"{item['repository']} there as {item['repository'].split('/')[-1]}, or leave out --source")
    cache = Path(data_dir) / CACHE
    fetch_dataset(ds, cache, source=local, jobs=min(4, len(files)))
    return ds.downloads(cache)


def raw_path(item: dict, path: str) -> str:
    """<owner>/<repository>/<commit>/<path, quoted>: where raw.githubusercontent.com serves a file."""
    return f"{item['repository']}/{item['commit']}/{quote(path)}"


# --- rebuilding the catalog from local clones ----------------------------------------------------------


class _Clone:
    """A local clone of one training_results repository (bare or checked out), read through git."""

    def __init__(self, path: Path, round_: str):
        self.path, self.round = path, round_
        self.commit = self._git("rev-parse", "HEAD").decode().strip()
        self.names = [n for n in self._git("ls-tree", "-r", "-z", "--name-only", "HEAD").decode().split("\0") if n]

    def _git(self, *args: str) -> bytes:
        proc = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True)
        if proc.returncode:
            raise UserError(f"{self.path}: git {args[0]} failed ({proc.stderr.decode(errors='replace').strip()[:200]}): "
                            "give a clone of an mlcommons/training_results_vX repository")
        return proc.stdout

    def read(self, name: str) -> bytes:
        """The file's bytes; _Absent where the clone lists it but lacks its content (a shallow or
        partial clone leaves out the largest files)."""
        proc = subprocess.run(["git", "-C", str(self.path), "cat-file", "blob", f"HEAD:{name}"], capture_output=True)
        if proc.returncode:
            raise _Absent(name)
        return proc.stdout


class _Absent(Exception):
    """A file the clone lists but does not hold."""


def find_clones(paths: list[Path]) -> list[_Clone]:
    """Each path is a clone whose path names its round (training_results_v3.0, or a folder inside
    one such as a bare mirror's repo/), or a folder holding such clones."""
    found: dict[str, _Clone] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"--rebuild {path} is not a folder: give clones of mlcommons/training_results_vX")
        m = re.search(r"training_results_v(\d+\.\d+)", str(path.resolve()))
        candidates = [(path, m.group(1))] if m else [
            (p, re.search(r"training_results_v(\d+\.\d+)", p.name).group(1))
            for p in sorted(path.iterdir()) if re.search(r"training_results_v\d+\.\d+$", p.name) and p.is_dir()]
        for clone_path, round_ in candidates:
            if (clone_path / "repo").is_dir() and not (clone_path / "HEAD").exists() and not (clone_path / ".git").exists():
                clone_path = clone_path / "repo"
            found[round_] = _Clone(clone_path, round_)
    if not found:
        raise UserError(f"no training_results_vX clone in {', '.join(map(str, paths))}: clone "
                        "https://github.com/mlcommons/training_results_v3.0 (and the other rounds) there")
    return [found[r] for r in sorted(found, key=lambda r: tuple(map(int, r.split("."))))]


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _published_scores(clone: _Clone) -> dict[str, tuple[float, str]]:
    """Scores the repository itself states: its submitters' summary.csv files, by result folder."""
    found = {}
    for name in clone.names:
        if not re.fullmatch(r"[^/]+/summary\.csv", name):
            continue
        for row in csv.DictReader(io.StringIO(clone.read(name).decode("utf-8", "replace"))):
            value, url = (row.get(BENCHMARK) or "").strip(), row.get("details_url") or ""
            if value and url.endswith(".json"):
                found[f"{name.split('/')[0]}/{url.rsplit('/', 1)[-1][:-5]}"] = (float(value), name)
    return found


def _stated_elsewhere(e: dict) -> dict:
    if e["published"] is None and e["id"] in STATED_ELSEWHERE:
        e["published"], e["published_in"] = STATED_ELSEWHERE[e["id"]]
    return e


def _entry(clone: _Clone, submitter: str, system: str, logs: dict[int, str], published: dict[str, tuple[float, str]],
           tmp: Path) -> dict:
    """One result folder as a catalog entry, its score recomputed from its logs."""
    desc_name = f"{submitter}/systems/{system}.json"
    desc = json.loads(clone.read(desc_name)) if desc_name in clone.names else {}
    parsed, files = {}, []
    where = {"repository": REPOSITORY.format(round=clone.round), "commit": clone.commit}
    for i, name in sorted(logs.items()):
        data = clone.read(name)
        local = tmp / f"result_{i}.txt"
        local.write_bytes(data)
        parsed[i] = parse_log(local)
        files.append({"name": local.name, "path": name, "url": f"{RAW_BASE}/{raw_path(where, name)}", "size": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    # Published runs passed review with their round's checker: no compliance run here (it would take hours).
    runs = [run_result(i, log, None) for i, log in parsed.items()]
    sc = score(runs)
    per_node, nodes = _int(desc.get("accelerators_per_node")), _int(desc.get("number_of_nodes"))
    first = next(iter(parsed.values()))
    return {
        "id": f"v{clone.round}/{submitter}/{system}", "round": clone.round, "submitter": submitter, "system": system,
        "system_name": str(desc.get("system_name") or system),
        "accelerator": str(desc.get("accelerator_model_name") or ""),
        "accelerators": (per_node or 0) * (nodes or 1), "nodes": nodes or 1,
        "division": str(desc.get("division") or first.submission.get("division", "")).lower(),
        "status": str(desc.get("status") or first.submission.get("status", "")),
        "framework": str(desc.get("framework") or ""),
        "score": None if sc.minutes is None else round(sc.minutes, 4), "score_note": sc.note,
        "published": published.get(f"{submitter}/{system}", (None, None))[0],
        "published_in": published.get(f"{submitter}/{system}", (None, None))[1],
        **where,
        "system_description": desc_name if desc else None, "logs": files,
    }


def entries_of(clone: _Clone) -> tuple[list[dict], list[str]]:
    """Every Mask R-CNN result folder of a clone as an entry, and a line for each folder left out
    because the clone lacks one of its logs."""
    folders: dict[tuple[str, str], dict[int, str]] = {}
    for name in clone.names:
        parts = name.split("/")
        if len(parts) == 5 and parts[1] == "results" and parts[3] == BENCHMARK and RESULT_NAME.match(parts[4]):
            folders.setdefault((parts[0], parts[2]), {})[int(RESULT_NAME.match(parts[4]).group(1))] = name
    published = _published_scores(clone)
    made, absent = [], []
    with tempfile.TemporaryDirectory(prefix="mlperf-catalog-") as tmp:
        for (submitter, system), logs in sorted(folders.items()):
            try:
                made.append(_entry(clone, submitter, system, logs, published, Path(tmp)))
            except _Absent as missing:
                absent.append(f"v{clone.round}/{submitter}/{system}: {missing} is not in the clone {clone.path}")
    return made, absent


def rebuild(paths: list[Path], output: Path = CATALOG) -> list[str]:
    """Write the catalog from local clones; returns a line for each result folder left out and each
    entry whose recomputed score is not the published one (or that has no score), for the person
    rebuilding it to read."""
    clones = find_clones(paths)
    entries, problems = [], []
    for clone in clones:
        made, absent = entries_of(clone)
        entries += [_stated_elsewhere(e) for e in made]
        problems += [f"left out: {line}" for line in absent]
    kept = {e["round"] for e in load(output).values()} - {c.round for c in clones} if output.is_file() else set()
    if kept:  # rounds not given this time keep their entries, so one clone can refresh one round
        entries = [e for e in load(output).values() if e["round"] in kept] + entries
        entries.sort(key=lambda e: (tuple(map(int, e["round"].split("."))), e["id"]))
    names = [cache_name(e["id"]) for e in entries]
    if len(set(names)) != len(names):
        raise UserError("two catalog ids make one cache folder name: make cache_name tell them apart")
    write_json(output, {"about": "published MLPerf Training Mask R-CNN results; rebuilt by "
                                 "python -m mlperf.results.catalog --rebuild DIR", "entries": entries}, indent=1)
    return problems + [f"differs: {line}" for e in entries if (line := _disagreement(e))]


def _disagreement(e: dict) -> str | None:
    if e["score"] is None:
        return f"{e['id']}: no score from its logs ({e['score_note']})"
    if e["published"] is not None and abs(e["published"] - e["score"]) > PUBLISHED_TOLERANCE:
        return f"{e['id']}: recomputed {e['score']:.2f} min, published {e['published']:.2f} min"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlperf.results.catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--rebuild", nargs="+", type=Path, metavar="DIR", required=True,
                        help="clones of mlcommons/training_results_vX (bare or checked out), or folders holding them")
    parser.add_argument("--output", type=Path, default=CATALOG, help="the catalog file to write (default: the project's)")
    args = parser.parse_args(argv)
    try:
        problems = rebuild(args.rebuild, args.output)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    entries = load(args.output)
    print(f"catalog: {len(entries)} results in {args.output}")
    for line in problems:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
