"""Backend.AI image labels as the manager and the agent read them: the schema, one check per label,
`validate_labels` for a set of them, and `invoke image --check FILE` on a Dockerfile's LABEL lines.
mlperf.image writes the labels; this module only judges them."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from mlperf.errors import UserError

# --- label schema ------------------------------------------------------------------------------
# As Backend.AI 23.09 to 26.8 reads the labels (lablup/backend.ai c0032c47 = 26.8.1, and the release
# tags 23.09.11 ... 26.4.3 where they differ). Two places decide:
#   * `admin image rescan`: common/docker.py validate_image_labels(). An image it rejects is skipped,
#     with only a warning in the manager's log (manager/container_registry/base.py _read_manifest).
#   * session start: the agent parses ai.backend.service-ports again, as one string
#     (common/service_ports.py), and the kernel runner starts `runtime-type`. Either failing fails
#     every session of an image that registered fine.
# A Problem is an error when some release in that range rejects the labels at one of the two, and a
# warning when Backend.AI takes them but drops or ignores part, or only newer releases take them.
BACKENDAI_RELEASES = "23.09 to 26.8"
FEATURES = {"uid-match", "user-input", "batch", "query", "tty", "operation", "private"}  # KernelFeatures
SERVICE_PROTOCOLS = ("tcp", "http", "preopen")             # every release
NEWER_PROTOCOLS = {"vnc": "26.2.0", "rdp": "26.2.0"}       # commit 7f965811 (#8431); 26.1 and older reject
DROPPED_PROTOCOLS = ("pty",)                               # service_ports.py: "unsupported, skip"
RESERVED_PORTS = {2000, 2001, 2002, 2003, 2200, 7681}      # the kernel runner, sshd and ttyd use them
RUNTIME_TYPES = {"app", "python", "vendor.aws_polly", "vendor.h2o"}   # kernel/__init__.py lang_map
REMOVED_RUNTIME_TYPES = {"c", "cpp", "golang", "rust", "java", "haskell", "julia", "lua", "nodejs",
                         "octave", "php", "r", "scheme", "git"}       # gone from 25.19.0 (02fbdac2)
ROLES = ("COMPUTE", "INFERENCE", "SYSTEM")
# Missing, 23.09 and 24.03 skip the image at rescan; 24.09 and later use these defaults.
REQUIRED_DEFAULTS = {"ai.backend.kernelspec": "1", "ai.backend.features": "uid-match",
                     "ai.backend.base-distro": "None", "ai.backend.runtime-type": "app",
                     "ai.backend.runtime-path": "/bin/true"}
# The agent's helper binaries (agent/kernel.py match_distro_data, the same rule in 23.09 and 26.8):
# one build per family and glibc, picked by the base-distro label. A binary runs on a glibc at least
# as new as the one it was built against, so a non-Ubuntu glibc base names the Ubuntu release whose
# glibc is not newer than its own (Debian and Ubuntu glibc from their release notes).
HELPER_FAMILIES = ("ubuntu", "centos", "alpine")
UBUNTU_GLIBC = {"18.04": (2, 27), "20.04": (2, 31), "22.04": (2, 35), "24.04": (2, 39)}
DEBIAN_GLIBC = {"10": (2, 28), "11": (2, 31), "12": (2, 36), "13": (2, 41)}
_SIZE = re.compile(r"^\d+(\.\d+)?([kmgtpe](i?b)?)?$", re.IGNORECASE)   # Backend.AI BinarySize: 8g, 512m
DISTRO = re.compile(r"^[a-z]+(-[a-z]+)?(\d+(\.\d+)*)?$")               # ubuntu22.04, centos7.6, static-gnu
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An image reference: [registry[:port]/]path[:tag][@digest], as docker's reference grammar spells it.
IMAGE_REFERENCE = re.compile(r"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
                              r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
ABSOLUTE_PATH = re.compile(r"/[\w./+-]+")
# Backend.AI's own pattern for one service-ports entry (common/service_ports.py), Unicode \w and \d
# and `$` before a final newline included: name:proto:port or name:proto:[port,port,...]
_SERVICE_PORT = re.compile(r"^(?P<name>[\w-]+):(?P<proto>\w+):(?P<ports>\[\d+(?:,\d+)*\]|\d+)(?:,|$)")

WARN = True    # the first item of a check's (warning, message) notes


@dataclass(frozen=True)
class Problem:
    label: str
    message: str
    warning: bool = False   # Backend.AI accepts it, but not as its author probably meant

    def __str__(self) -> str:
        return f"{self.label}: {'warning: ' if self.warning else ''}{self.message}"


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
    """t.ToInt(gte=1, lte=1): what Python's int() reads, and only 1."""
    try:
        number = int(value)
    except ValueError:
        return f"{value!r} is not a whole number (Backend.AI accepts only 1)"
    return None if number == 1 else f"{value!r}: Backend.AI accepts only kernelspec 1"


def _features(value: str) -> list[tuple[bool, str]] | str:
    """Rescan splits on single spaces and rejects an empty item; the agent then uses .split()."""
    if "" in value.split(" "):
        return (f"{value!r} has an empty item: separate features by single spaces, none before or after "
                f"(Backend.AI's rescan rejects it)")
    features = value.split()
    notes = []
    unknown = sorted(set(features) - FEATURES)
    if unknown:
        notes.append((WARN, f"Backend.AI ignores unknown feature(s) {', '.join(unknown)} "
                            f"(it knows {', '.join(sorted(FEATURES))})"))
    if "uid-match" not in features:
        notes.append((WARN, "no uid-match: sessions run as uid 9001, not the agent's user, so files "
                            "written to mounted vfolders get an owner the storage does not expect"))
    return notes


def distro_advice(value: str) -> str:
    """Which base-distro to name instead of `value` (one the agent serves), and why."""
    if (m := re.fullmatch(r"debian(\d+)(\.\d+)*", value)) and m[1] in DEBIAN_GLIBC:
        glibc = DEBIAN_GLIBC[m[1]]
        ubuntu, needs = max(((v, g) for v, g in UBUNTU_GLIBC.items() if g <= glibc), key=lambda vg: vg[1])
        return (f"label it ubuntu{ubuntu}: Debian {m[1]} has glibc {_dotted(glibc)}, and the helpers built "
                f"for Ubuntu {ubuntu} need glibc {_dotted(needs)} or newer (pass --distro ubuntu{ubuntu})")
    return ("name the Ubuntu release whose glibc is not newer than the image's (`ldd --version` in it; "
            + ", ".join(f"ubuntu{v}: {_dotted(g)}" for v, g in UBUNTU_GLIBC.items())
            + "), centos<version> for a RHEL-like base, or alpine<version> for musl")


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _distro(value: str) -> str | None:
    """The agent picks its helper binaries by the label's name without its version suffix; a name
    no helper family starts with fails every session (UnsupportedBaseDistroError), though the
    rescan registers the image."""
    if not value:
        return "is empty (Backend.AI's rescan rejects a blank base-distro)"
    family = re.sub(r"\d+(\.\d+)*$", "", value)
    if family in HELPER_FAMILIES:
        return None
    return (f"{value!r}: the agent has its helper binaries (su-exec, libbaihook, dropbear) only for "
            f"{', '.join(f + '*' for f in HELPER_FAMILIES)} and fails every session of this image "
            f"(UnsupportedBaseDistroError), though the rescan registers it: {distro_advice(value)}")


def _runtime_type(value: str) -> list[tuple[bool, str]] | str | None:
    if value in RUNTIME_TYPES:
        return None
    if value in REMOVED_RUNTIME_TYPES:
        return [(WARN, f"{value!r}: Backend.AI 25.19 and newer have no kernel runner for it "
                       f"(left: {', '.join(sorted(RUNTIME_TYPES))})")]
    return (f"{value!r} is not a kernel runner Backend.AI has ({', '.join(sorted(RUNTIME_TYPES))}): "
            f"the image registers but every session fails to start")


def _runtime_path(value: str) -> list[tuple[bool, str]] | None:
    if value.startswith("/") and " " not in value:
        return None
    return [(WARN, f"{value!r} is not an absolute path: the kernel runner runs it as given")]


def _role(value: str) -> str | None:
    return None if value in ROLES else f"{value!r} is not one of {', '.join(ROLES)} (case matters)"


def _accelerators(value: str) -> str | None:
    if value and not re.fullmatch(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", value):
        return f"{value!r} is not a comma-separated list like cuda"
    return None


def _corecount(value: str) -> str | None:
    bad = [name for name in value.split(",") if value and not _ENV_NAME.match(name)]
    return f"{', '.join(map(repr, bad))} not environment variable name(s)" if bad else None


def parse_service_ports(value: str) -> tuple[dict[str, str], list[tuple[bool, str]]]:
    """The agent's parse of the label string at session start (common/service_ports.py), message
    by message: {name: protocol} of the entries kept, and the (warning, message) notes.

    Backend.AI stops at the first error; this goes on where it can, to list them all. At rescan the
    label is first split on every comma, so a malformed entry or a [port,port] list is not checked
    there: the image registers, and the agent's parse then fails each session."""
    ports, notes, used, rest = {}, [], set(), value
    while rest:
        m = _SERVICE_PORT.match(rest)
        if not m:   # Backend.AI stops here; skip to the next entry to report the rest too
            piece = re.match(r"[^,\[]*(?:\[[^\]]*\]?)?[^,]*,?", rest)[0] or rest
            notes.append((False, f"{piece.rstrip(',')!r} is not name:proto:port or name:proto:[port,...] "
                                 f"(Backend.AI: 'Invalid service-ports format'; commas alone between entries)"))
            rest = rest[len(piece):]
            continue
        rest, entry, proto = rest[len(m[0]):], m[0].rstrip(","), m["proto"]
        if proto in DROPPED_PROTOCOLS:
            notes.append((WARN, f"{entry!r}: Backend.AI drops {proto} entries without a word (no app "
                                f"appears): use http or tcp"))
            continue
        if proto in NEWER_PROTOCOLS:
            notes.append((WARN, f"{entry!r}: {proto} needs Backend.AI {NEWER_PROTOCOLS[proto]} or newer; "
                                f"older managers skip the whole image at rescan"))
        elif proto not in SERVICE_PROTOCOLS:
            notes.append((False, f"{entry!r}: protocol {proto!r} is not one of "
                                 f"{', '.join(SERVICE_PROTOCOLS + tuple(NEWER_PROTOCOLS))}"))
            continue
        for port in map(int, m["ports"].strip("[]").split(",")):
            if port in used:
                notes.append((False, f"{entry!r}: port {port} is already used by another service port"))
            elif not 1024 < port < 65535:
                notes.append((False, f"{entry!r}: port {port} must be between 1025 and 65534 (no root)"))
            elif port in RESERVED_PORTS:
                notes.append((False, f"{entry!r}: port {port} is reserved by Backend.AI (2000-2003, 2200, 7681)"))
            used.add(port)
        if m["name"] in ports:   # the agent keys its port map by name: the later entry replaces it
            notes.append((WARN, f"{entry!r}: the name {m['name']!r} is used twice; Backend.AI keeps only the last"))
        ports[m["name"]] = proto
    return ports, notes


def _service_ports(value: str) -> list[tuple[bool, str]]:
    return parse_service_ports(value)[1]


# label -> (required, check). Other ai.backend.* labels are left alone: Backend.AI has more of them.
LABEL_SCHEMA: dict[str, tuple[bool, object]] = {
    "ai.backend.kernelspec": (True, _kernelspec),
    "ai.backend.features": (True, _features),
    "ai.backend.base-distro": (True, _distro),
    "ai.backend.runtime-type": (True, _runtime_type),
    "ai.backend.runtime-path": (True, _runtime_path),
    "ai.backend.role": (False, _role),
    "ai.backend.resource.min.cpu": (False, lambda v: _int(v, 1)),
    "ai.backend.resource.min.mem": (False, _size),
    "ai.backend.resource.min.cuda.device": (False, lambda v: _int(v, 0)),
    "ai.backend.resource.min.cuda.shares": (False, _number),
    "ai.backend.resource.preferred.shmem": (False, _size),
    "ai.backend.accelerators": (False, _accelerators),
    "ai.backend.envs.corecount": (False, _corecount),
    "ai.backend.service-ports": (False, _service_ports),
}
# Not required by Backend.AI, but without them a session may get less than training needs.
RECOMMENDED = ("ai.backend.resource.min.cpu", "ai.backend.resource.min.mem")


def _notes(result) -> list[tuple[bool, str]]:
    return [] if not result else [(False, result)] if isinstance(result, str) else list(result)


def _inference_problems(labels: dict[str, str]) -> list[Problem]:
    """role INFERENCE: three more labels, and each endpoint port a preopen service port."""
    missing = [Problem(k, "missing (required for role INFERENCE)") for k in
               ("ai.backend.endpoint-ports", "ai.backend.model-path", "ai.backend.model-format") if k not in labels]
    if missing:
        return missing
    ports = parse_service_ports(labels.get("ai.backend.service-ports", ""))[0]
    return [Problem("ai.backend.endpoint-ports", f"{name!r} is not a preopen service port")
            for name in labels["ai.backend.endpoint-ports"].split(",") if ports.get(name) != "preopen"]


def validate_labels(labels: dict[str, str]) -> list[Problem]:
    """Every problem with a Dockerfile's Backend.AI labels (BACKENDAI_RELEASES), errors and warnings."""
    problems = []
    for name, (required, check) in LABEL_SCHEMA.items():
        if name not in labels:
            if required:
                problems.append(Problem(name, f"missing (Backend.AI 23.09 and 24.03 skip the image at rescan; "
                                              f"24.09 and later use {REQUIRED_DEFAULTS[name]!r})"))
            elif name in RECOMMENDED:
                problems.append(Problem(name, "missing: Backend.AI then starts sessions with less than "
                                              "training needs (23.09 defaults to 1 core, 1g)", WARN))
            continue
        problems += [Problem(name, message, warning) for warning, message in _notes(check(str(labels[name])))]
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
    if labels.get("ai.backend.role") == "INFERENCE":
        problems += _inference_problems(labels)
    return problems


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if not p.warning]


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
_BARE_VARIABLE = re.compile(r"\$(?P<name>)(?P<op>)(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def _substitute(text: str, known: dict[str, str]) -> str:
    """Docker's substitution in one linear pass: a `${` after the last `}` cannot close, so only
    bare `$NAME`s are looked for there (searching each unclosed `${X:-` to the end is quadratic)."""
    text = str(text)
    closed = text.rfind("}") + 1
    head, tail = text[:closed], text[closed:]

    def one(match: re.Match) -> str:
        name = match["name"] or match["bare"]
        value, op = known.get(name), match["op"]
        if op in ("-", ":-"):
            return value if value is not None and (value or op == "-") else match["word"]
        if op in ("+", ":+"):
            return match["word"] if value is not None and (value or op == "+") else ""
        return value or ""
    return _VARIABLE.sub(one, head) + _BARE_VARIABLE.sub(one, tail)


def check_dockerfile(path: Path) -> None:
    """`invoke image --check FILE`: print each label problem; exit 1 on errors, else one "ok" line."""
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
    for problem in problems:
        print(f"{path}: {problem}")
    failed = errors(problems)
    if failed:
        raise UserError(f"{path}: {len(failed)} Backend.AI label problem(s), listed above; fix them and "
                        f"run `invoke image --check {path}` again")
    warned = f" ({len(problems)} warning(s) above)" if problems else ""
    print(f"ok: {path}: Backend.AI {BACKENDAI_RELEASES} accepts these labels{warned}")
