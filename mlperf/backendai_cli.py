"""The user's own `backend.ai` client, driven as a program and never imported: its settings (never
shown: `redact`), the release that matches the manager, finding and running it with a timeout, and
its failures turned into one line each (`client_error`). mlperf.session builds the tasks on it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import shown

CLIENT = "backend.ai"
_HTTP_STATUS = re.compile(r"BackendAPIError(?::\s*|\()(\d{3})")
GREETING_CAP = 64 * 1024   # the manager's greeting is a few dozen bytes; more is not a greeting


# --- the client -----------------------------------------------------------------------------------

def client_settings(environ=os.environ, cwd: Path | None = None) -> dict:
    """The BACKEND_* settings the client will use: the environment, overridden (as the client does)
    by the first .env found from the current folder upwards."""
    settings = {k: v for k, v in environ.items() if k.startswith(("BACKEND_", "SORNA_"))}
    folder = Path(cwd or os.getcwd()).resolve()
    for candidate in (folder, *folder.parents):
        dotenv = candidate / ".env"
        if dotenv.is_file():
            try:
                lines = dotenv.read_text(errors="replace").splitlines()
            except OSError:
                break
            for line in lines:
                key, sep, value = line.strip().removeprefix("export ").partition("=")
                if sep and key.strip().startswith(("BACKEND_", "SORNA_")):
                    settings[key.strip()] = value.strip().strip("'\"")
            break
    return settings


def redact(text: str, settings: dict | None = None) -> str:
    """`text` with the client's access and secret keys (wherever they were read from) as ***."""
    settings = client_settings() if settings is None else settings
    for prefix in ("BACKEND_", "SORNA_"):
        for key in ("ACCESS_KEY", "SECRET_KEY"):
            secret = settings.get(prefix + key, "")
            if len(secret) >= 4:
                text = text.replace(secret, "***")
    return text


def client_requirement(manager: str) -> tuple[str, str]:
    """(pip requirement, Python minor) of the client for a manager release, e.g. 23.09.11 ->
    ("'backend.ai-client~=23.9.0' 'yarl<1.17.1'", "3.11"): the client pins one Python minor per release
    (23.09: 3.11; 24.x to 25.5: 3.12; 25.6 on: 3.13), and 23.9.10, the last 23.09 on PyPI, cannot sign
    requests with yarl 1.17.1 or later (fixed upstream in lablup/backend.ai#3544, never released)."""
    m = re.match(r"(\d+)\.(\d+)", manager)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    python = "3.10" if major < 23 else "3.11" if major == 23 else "3.12" if (major, minor) < (25, 6) else "3.13"
    requirement = f"'backend.ai-client~={major}.{minor}.0'" + (" 'yarl<1.17.1'" if major == 23 else "")
    return requirement, python


def manager_version(endpoint: str | None, timeout: float = 5) -> str | None:
    """The manager's release from its unauthenticated greeting (GET / answers {"version", "manager"}),
    or None: read at most GREETING_CAP bytes within `timeout` in all (a manager that trickles or sends
    without end is no help), and only a short plain version is taken."""
    if not endpoint:
        return None
    deadline = time.monotonic() + timeout
    body = b""
    try:
        with urllib.request.urlopen(endpoint.split(",")[0].strip(), timeout=timeout) as answer:
            while len(body) <= GREETING_CAP and time.monotonic() < deadline:
                chunk = answer.read1(GREETING_CAP + 1 - len(body))   # one socket read: a trickle can't hold it
                if not chunk:
                    break
                body += chunk
            else:
                return None
        version = json.loads(body).get("manager")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return version if isinstance(version, str) and re.fullmatch(r"\d+\.\d+[\w.+-]{0,30}", version) else None


def install_hint(client: str) -> str:
    from mlperf.datasets import redact_url

    settings = client_settings()
    endpoint = settings.get("BACKEND_ENDPOINT") or settings.get("SORNA_ENDPOINT")
    version = manager_version(endpoint)
    then = ("then put ~/.backendai/bin on PATH or set INVOKE_MLPERF_SESSION_CLIENT=~/.backendai/bin/backend.ai "
            "(mlperf.session.client)")
    if version:
        requirement, python = client_requirement(version)
        return (f"the Backend.AI client `{client}` is not installed (or not on PATH); your manager "
                f"({redact_url(endpoint.split(',')[0].strip())}) is {version}, whose client needs Python {python}: "
                f"python{python} -m venv ~/.backendai && ~/.backendai/bin/pip install {requirement}, {then}")
    return (f"the Backend.AI client `{client}` is not installed (or not on PATH): install the release of your "
            "manager's version (`curl $BACKEND_ENDPOINT` shows it) with the Python that release pins (23.09: 3.11; "
            "24.x to 25.5: 3.12; 25.6 and 26.x: 3.13), e.g. python3.12 -m venv ~/.backendai && "
            f"~/.backendai/bin/pip install 'backend.ai-client~=24.9.0', {then}")


def older_client() -> str:
    settings = client_settings()
    version = manager_version(settings.get("BACKEND_ENDPOINT") or settings.get("SORNA_ENDPOINT"))
    requirement, python = client_requirement(version) if version else ("'backend.ai-client~=MAJOR.MINOR.0'", "")
    return (f"your backend.ai client is older than the manager{f' ({version})' if version else ''}: if a request "
            f"fails, install the matching client{f' with Python {python}' if python else ''}: "
            f"pip install {requirement}")


def find_client(client: str | None) -> str:
    name = os.path.expanduser(client or CLIENT)
    exe = shutil.which(name)
    if exe is None:
        raise UserError(install_hint(name))
    return exe


def run_client(exe: str, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    """The client with this environment (where its credentials are), minus what would make its Python
    load this project's packages instead of its own."""
    try:
        return subprocess.run([exe, *args], env=client_env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:   # the 23.09 client hangs after some errors it does not catch
        words = args[2:] if args[:1] == ["--output"] else args
        what = " ".join(words[:1] if words[:1] == ["ps"] else words[:2])
        stuck = subprocess.CompletedProcess(exc.cmd, 1, text_of(exc.stdout), text_of(exc.stderr))
        error = client_error(stuck, what)
        if str(error).startswith(f"backend.ai {what} failed"):   # nothing recognisable in what it printed
            error = UserError(f"`backend.ai {what}` got no answer within {timeout:.0f} s: check "
                              "BACKEND_ENDPOINT and the manager")
        raise error from None


def client_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def text_of(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def client_error(proc: subprocess.CompletedProcess, action: str, *, name: str | None = None,
                 image: str | None = None, vfolder: str | None = None) -> UserError:
    """One line for a failed client call, from what the 23.09 client prints (its exit code is 1 for
    every failure, so the text decides): what went wrong and what to do."""
    from mlperf.datasets import redact_url

    text = redact(f"{proc.stdout}\n{proc.stderr}")
    low = text.lower()
    status = int(m.group(1)) if (m := _HTTP_STATUS.search(text)) else None
    detail = _detail(text)
    if "object has no attribute 'netloc'" in text:
        return UserError("this backend.ai-client cannot sign requests with the yarl it has (1.17.1 or later): "
                         "pip install 'yarl<1.17.1' into the client's environment")
    if "request to the api endpoint has failed" in low:
        return UserError("cannot reach the Backend.AI manager: check BACKEND_ENDPOINT (or the .env the client "
                         "reads) and your network")
    if "date/time sync error" in low:
        return UserError("the manager refused the request: this machine's clock is more than 15 minutes off "
                         "the manager's; set it right (NTP) and try again")
    if status == 401 or "auth-failed" in low or "invalid-auth-params" in low:
        kind = "401 auth-failed" if status == 401 or "auth-failed" in low else f"{status} invalid-auth-params"
        return UserError(f"the manager refused the credentials ({kind}{': ' + detail if detail else ''}): "
                         "check BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY (or the .env the client reads) "
                         "against your keypair, and BACKEND_ENDPOINT")
    return _object_error(low, status, detail, action, name=name, image=image, vfolder=vfolder) or UserError(
        f"backend.ai {action} failed{f' ({status})' if status else ''}: "
        f"{redact_url(detail or said(_last_line(text)) or f'exit code {proc.returncode}')}")


def said(value, limit: int = 300) -> str:
    """A value from the manager in a message or a status line: as it is where mlperf.files.shown would
    not change it (plain, short text reads better unquoted), else as shown renders it."""
    rendered = shown(value, limit)
    return value if isinstance(value, str) and rendered == repr(value) else rendered


def _object_error(low: str, status, detail: str, action: str, *, name, image, vfolder) -> UserError | None:
    """The errors about what a request names: the image, the vfolder, the session, the resources."""
    if "image reference" in low or "environment image" in low or "unknown image" in low:
        from mlperf.image import has_registry

        registry = image.split("/", 1)[0] if image and has_registry(image) else "REGISTRY"
        return UserError(f"Backend.AI does not know the image {image}: push it and have an admin register it "
                         f"with `backend.ai admin image rescan -r {registry}` (25.1+: add -p PROJECT for one "
                         "Harbor project), or pass --image with a name `backend.ai admin image list` shows")
    if "virtual folder" in low and (status == 404 or "not found" in low):
        return UserError(f"there is no vfolder {vfolder} you can mount: create it with "
                         f"`backend.ai vfolder create {vfolder}` (data/ and results/ go there), or pass --vfolder")
    if "session-already-exists" in low or "session already exists" in low:
        return UserError(f"a session named {name} exists already: pick another --name, or watch that one "
                         f"with `invoke session.status {name}`")
    if "no such session" in low:
        return UserError(f"there is no active session named {name} (it ended, or never existed): "
                         f"`invoke session.status {name}` shows how it ended")
    if "quota-exceeded" in low or "resource limit" in low:
        return UserError(f"Backend.AI refused {action}: you have reached your resource limit "
                         f"({detail or 'keypair resource policy'}); end other sessions or ask for more")
    if "invalid-api-params" in low or "missing or invalid api parameters" in low:
        return UserError(f"Backend.AI refused {action}: {detail or 'invalid parameters'}")
    return None


def _detail(text: str) -> str:
    """The server's message in the client's error print: `➜ Message: ...` or `- ...` lines."""
    found = re.findall(r"\u279c Message: (.+)", text) or re.findall(r"^\s*- (.+)$", text, re.M)
    if not found:
        found = re.findall(r"'msg': '([^']+)'", text)   # --output json prints the error's repr
    if not found:
        found = re.findall(r'^\s*"error": "(.+)",?\s*$', text, re.M)   # ... or its own failure's text
    return said("; ".join(part.strip() for part in found)) if found else ""


def _last_line(text: str) -> str:
    lines = [ln.strip(" \u2718\u2714") for ln in text.splitlines() if ln.strip() and "Traceback" not in ln]
    return lines[-1] if lines else ""
