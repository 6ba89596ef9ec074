"""A fake Backend.AI manager (and the storage proxy and agent behind it) on 127.0.0.1, for test_session.

A real manager needs PostgreSQL, Redis, etcd, a storage proxy and a Docker-based agent, none of which
run here. This is a real HTTP server that answers only the calls the real backend.ai-client 23.9.10
makes for `session create|logs|destroy`, `ps` (GraphQL), `vfolder ls|download`, with the bodies, status
codes and RFC 7807 errors that manager 23.09.11 sends (lablup/backend.ai at tag 23.09.11: api/session.py,
api/vfolder.py, api/exceptions.py, registry.py, scheduler/dispatcher.py, storage/api/). Every call but
the greeting and the storage proxy's download must carry the client's HMAC-SHA256 signature, checked as
the manager's auth middleware checks it (api/auth.py: sign_request, check_date); a bad one gets 401.
Every request is recorded.

A created session "runs" its startup command with /bin/sh on this machine, as the kernel runner does
(batch mode: asyncio.create_subprocess_shell), with the session's environ, `bin_dirs` first on PATH and
$FAKE_HOME_WORK standing for /home/work, where each mounted vfolder is a link to its folder here. Its
output is the console `session logs` returns, kept after the end as the manager keeps container_log.

A hostile or broken manager, for tests/test_hostile_sessions.py, is the same server with one of these
set: `greeting` (the raw body of GET /, written in chunks and counted, so a test sees how much of it a
reader took), `FakeSession.shown_as` (ps fields answered in place of the real ones), `extra_entries`
(names a `vfolder ls` adds to a folder, served on download), `stalled` (downloads that stop mid-file
until the manager closes) and `failing_images` (images whose sessions fail to start with the agent's
error, as 23.09's dispatcher records it in status_data).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PROBS = "https://api.backend.ai/probs/"
REMOVAL_LIMIT_S = 60.0   # the longest an ended session waits for its console to be asked (removal_misses)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: object
    status: int = 0
    signed: bool = False      # carried a signature the manager's check accepted


@dataclass
class FakeSession:
    name: str
    request: dict
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "PENDING"
    status_info: str | None = None
    status_data: dict | None = None
    result: str = "UNDEFINED"
    console: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    terminated_at: str | None = None
    process: subprocess.Popen | None = None
    shown_as: dict = field(default_factory=dict)   # ps (GraphQL) fields answered instead of the real ones
    console_misses: int = 0                        # console requests answered 500 while TERMINATING


@dataclass
class Stream:
    """An answer written in chunks: `length` is its Content-Length; `chunks()` gives them anew for each
    request and may stop short or wait (a stall)."""
    length: int
    chunks: object
    kind: str = "application/octet-stream"


class ApiError(Exception):
    def __init__(self, status: int, kind: str, title: str, msg: str | None = None, data=None):
        super().__init__(title)
        body = {"type": PROBS + kind, "title": title}
        body.update({k: v for k, v in (("msg", msg), ("data", data)) if v is not None})
        self.status, self.body = status, body


def signature(secret: str, method: str, raw_path: str, raw_date: str, host: str, content_type: str,
              version: str, date: datetime) -> str:
    """The manager's sign_request (23.09.11 api/auth.py): the body is not hashed for API >= v4.20181215."""
    body_hash = hashlib.sha256(b"").hexdigest()
    sign_bytes = (f"{method}\n{raw_path}\n{raw_date}\nhost:{host}\ncontent-type:{content_type}\n"
                  f"x-backendai-version:{version}\n{body_hash}").encode()
    key = hmac.new(secret.encode(), date.strftime("%Y%m%d").encode(), "sha256").digest()
    key = hmac.new(key, host.encode(), "sha256").digest()
    return hmac.new(key, sign_bytes, "sha256").hexdigest()


class FakeManager:
    def __init__(self, *, access_key: str, secret_key: str, images: set[str], vfolders: dict[str, Path],
                 home_root: Path, bin_dirs: list[Path], gpus: int = 8, version: str = "23.09.11",
                 api_version: str = "v7.20230615"):
        self.keys = {access_key: secret_key}
        self.images, self.vfolders, self.gpus = set(images), dict(vfolders), gpus
        self.home_root, self.bin_dirs, self.version = Path(home_root), list(bin_dirs), version
        self.api_version = api_version   # 23.09.11's LATEST_API_VERSION; 24.09: v8.20240915
        self.requests: list[Recorded] = []
        self.sessions: list[FakeSession] = []
        self.tokens: dict[str, Path | bytes] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()             # set on exit: stalled answers end then
        self.greeting: Stream | None = None          # GET /'s raw answer instead of the real greeting
        self.greeting_sent = 0                       # bytes of it the socket took
        self.extra_entries: dict[str, dict[str, bytes]] = {}   # folder -> {listed name: content}
        self.stalled: set[str] = set()               # vfolder paths whose download stops half way
        self.failing_images: dict[str, tuple[str, str]] = {}   # image -> (agent error name, its repr)
        # Console requests an ended session answers 500 while it stays TERMINATING with its container
        # gone, as 23.09's does for a moment (the local stack showed it: registry.get_logs_from_agent,
        # DockerError 404). Counted, not timed, so a loaded machine's slow client cannot poll past it;
        # REMOVAL_LIMIT_S bounds it for a client that never asks.
        self.removal_misses = 0
        handler = type("Handler", (_Handler,), {"manager": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeManager:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        for sess in self.sessions:
            if sess.process and sess.process.poll() is None:
                sess.process.kill()
                sess.process.wait()

    def session(self, name: str) -> FakeSession | None:
        """The newest session of that name."""
        matches = [s for s in self.sessions if s.name == name]
        return matches[-1] if matches else None

    def wait_ended(self, name: str, timeout: float = 30) -> FakeSession:
        sess = self.session(name)
        if sess.process:
            sess.process.wait(timeout)
        for _ in range(int(timeout * 20)):
            if sess.status == "TERMINATED":
                break
            threading.Event().wait(0.05)
        return sess

    # --- auth ---------------------------------------------------------------------------------

    def check_auth(self, handler: BaseHTTPRequestHandler) -> None:
        header = handler.headers.get("Authorization")
        if not handler.headers.get("Date"):
            raise ApiError(400, "invalid-auth-params", "Missing or invalid authorization parameters.",
                           "Date/time sync error")
        raw_date = handler.headers["Date"]
        try:
            date = datetime.fromisoformat(raw_date)
        except ValueError:
            raise ApiError(400, "invalid-auth-params", "Missing or invalid authorization parameters.",
                           "Date/time sync error") from None
        date = date if date.tzinfo else date.replace(tzinfo=timezone.utc)
        if abs(datetime.now(timezone.utc) - date) > timedelta(minutes=15):
            raise ApiError(400, "invalid-auth-params", "Missing or invalid authorization parameters.",
                           "Date/time sync error")
        if not header:
            raise ApiError(401, "auth-failed", "Credential/signature mismatch.", "Unauthorized access")
        kind, _, params = header.partition(" ")
        fields = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        access_key, _, given = fields.get("credential", "").partition(":")
        if kind not in ("BackendAI", "Sorna") or fields.get("signMethod") != "HMAC-SHA256" or not given:
            raise ApiError(400, "invalid-auth-params", "Missing or invalid authorization parameters.",
                           "Missing or malformed authorization parameters")
        if access_key not in self.keys:
            raise ApiError(401, "auth-failed", "Credential/signature mismatch.", "Access key not found")
        content_type = (handler.headers.get("Content-Type") or "application/octet-stream").split(";")[0]
        expected = signature(self.keys[access_key], handler.command, handler.path, raw_date,
                             handler.headers.get("Host", ""), content_type.strip().lower(),
                             handler.headers.get("X-BackendAI-Version", ""), date)
        if not hmac.compare_digest(expected, given):
            raise ApiError(401, "auth-failed", "Credential/signature mismatch.", "Signature mismatch")

    # --- routes -------------------------------------------------------------------------------

    def route(self, handler, method: str, path: str, query: dict, body):
        if method == "GET" and path in ("", "/"):
            return 200, self.greeting or {"version": self.api_version, "manager": self.version}
        if method == "GET" and path == "/manager/announcement":   # no auth (23.09.11 api/manager.py)
            return 200, {"enabled": False, "message": ""}
        if method == "GET" and path == "/download":   # the storage proxy: its JWT token is the check
            return self.storage_download(query)
        self.check_auth(handler)
        handler.record.signed = True
        if method == "POST" and path == "/session":
            return self.create(body)
        if method == "POST" and path == "/admin/gql":
            return self.graphql(body)
        if m := re.fullmatch(r"/session/([^/]+)/logs", path):
            return self.logs(m.group(1))
        if method == "DELETE" and (m := re.fullmatch(r"/session/([^/]+)", path)):
            return self.destroy(m.group(1))
        if method == "GET" and (m := re.fullmatch(r"/folders/([^/]+)/files", path)):
            return self.list_files(m.group(1), body)
        if method == "POST" and (m := re.fullmatch(r"/folders/([^/]+)/request-download", path)):
            return self.request_download(m.group(1), body)
        raise ApiError(404, "url-not-found", "Unknown URL path.")

    def create(self, body: dict):
        """POST /session (23.09.11 api/session.py create_from_params, registry.py create_session)."""
        name, image, config = body.get("name"), body.get("image"), body.get("config") or {}
        if image not in self.images:
            raise ApiError(404, "object-not-found", "No such image reference.", f"Unknown image reference: {image}")
        for vfolder in config.get("mounts") or []:
            if vfolder not in self.vfolders:
                raise ApiError(404, "object-not-found", "No such virtual folder.",
                               f"VFolder {vfolder} is not found or accessible.")
        old = self.session(name)
        if old and old.status not in ("TERMINATED", "CANCELLED") and not body.get("reuseIfExists", True):
            raise ApiError(400, "session-already-exists",
                           "The session already exists but you requested not to reuse existing one.",
                           data={"existingSessionId": old.id})
        if body.get("type") == "batch" and not body.get("startupCommand"):
            raise ApiError(400, "invalid-api-params", "Missing or invalid API parameters.",
                           "Batch sessions must have a non-empty startup command.")
        sess = FakeSession(name=name, request=body)
        with self.lock:
            self.sessions.append(sess)
        if image in self.failing_images:
            self.fail_to_start(sess, *self.failing_images[image])
            return 201, {"sessionId": sess.id, "sessionName": name, "status": "CANCELLED", "servicePorts": [],
                         "created": True}
        wanted = int((config.get("resources") or {}).get("cuda.device", 0)) * int(body.get("clusterSize", 1))
        if wanted > self.gpus:
            sess.status_info = "no-available-instances"
            sess.status_data = {"scheduler": {"retries": 3, "last_try": sess.created_at, "msg": (
                "Could not find a contiguous resource region in any agent big enough to host the session "
                f"(id: {sess.id}, resource group: default)")}}
            state = "PENDING" if body.get("enqueueOnly") else "TIMEOUT"   # maxWaitSeconds ran out
        else:
            self.start(sess)
            state = "RUNNING"
        return 201, {"sessionId": sess.id, "sessionName": name, "status": state, "servicePorts": [],
                     "created": True}

    def fail_to_start(self, sess: FakeSession, error: str, text: str) -> None:
        """The agent refused to create the container: 23.09.11 scheduler/dispatcher.py start_session
        cancels the session with convert_to_status_data(MultiAgentError([AgentError(...)]))."""
        sess.status, sess.status_info = "CANCELLED", "failed-to-start"
        sess.status_data = {"error": {"src": "agent", "name": "MultiAgentError", "repr": "MultiAgentError(1)",
                                      "collection": [{"src": "agent", "name": error, "repr": text}]}}
        sess.terminated_at = datetime.now(timezone.utc).isoformat()

    def start(self, sess: FakeSession) -> None:
        """Run the startup command as the kernel runner would, its output becoming the console."""
        home = self.home_root / sess.id
        home.mkdir(parents=True)
        for vfolder in (sess.request.get("config") or {}).get("mounts") or []:
            (home / vfolder).symlink_to(self.vfolders[vfolder])
        env = {"PATH": os.pathsep.join([*map(str, self.bin_dirs), "/usr/bin", "/bin"]), "HOME": str(home),
               "FAKE_HOME_WORK": str(home), "_BACKEND_BATCH_MODE": "1", "BACKENDAI_SESSION_NAME": sess.name,
               "BACKENDAI_CLUSTER_SIZE": str(sess.request.get("clusterSize", 1)),
               **((sess.request.get("config") or {}).get("environ") or {})}
        sess.status = "RUNNING"
        sess.process = subprocess.Popen(["/bin/sh", "-c", sess.request["startupCommand"]], cwd=home, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._collect, args=(sess,), daemon=True).start()

    def _collect(self, sess: FakeSession) -> None:
        while chunk := sess.process.stdout.read1(4096):
            with self.lock:
                sess.console += chunk.decode(errors="replace")
        code = sess.process.wait()
        if self.removal_misses:
            with self.lock:
                sess.status = "TERMINATING" if sess.status == "RUNNING" else sess.status
            deadline = time.monotonic() + REMOVAL_LIMIT_S
            while sess.console_misses < self.removal_misses and time.monotonic() < deadline:
                time.sleep(0.05)
        with self.lock:
            if sess.status in ("RUNNING", "TERMINATING"):   # not destroyed meanwhile
                sess.result = "SUCCESS" if code == 0 else "FAILURE"
                self._end(sess, "task-finished")

    def _end(self, sess: FakeSession, reason: str) -> None:
        sess.status, sess.status_info = "TERMINATED", reason
        sess.status_data = {"kernel": {"exit_code": None}, "session": {"status": "terminated"}}
        sess.terminated_at = datetime.now(timezone.utc).isoformat()

    def _active(self, name: str) -> FakeSession:
        sess = self.session(name)
        if sess is None or sess.status in ("TERMINATED", "CANCELLED"):
            raise ApiError(404, "object-not-found", "No such session.")
        return sess

    def logs(self, name: str):
        """GET /session/{name}/logs: a dead session's log comes from the database (allow_stale)."""
        sess = self.session(name)
        if sess is None:
            raise ApiError(404, "object-not-found", "No such session.")
        if sess.status == "PENDING":
            raise ApiError(500, "internal-server-error", "Internal server error.")   # no agent to ask
        if sess.status == "TERMINATING":
            sess.console_misses += 1
            raise ApiError(500, "kernel-execution-failed", "Executing user code in the kernel has failed.",
                           "Agent-side exception occurred. (DockerError(404, 'No such container: 7659'))")
        with self.lock:
            return 200, {"result": {"logs": sess.console}}

    def destroy(self, name: str):
        sess = self._active(name)
        with self.lock:
            if sess.process and sess.process.poll() is None:
                sess.process.kill()
            sess.result = "FAILURE" if sess.process else sess.result
            self._end(sess, "user-requested")
            if sess.process is None:   # never started: the scheduler cancels it
                sess.status = "CANCELLED"
        return 200, {"stats": {}}

    def graphql(self, body: dict):
        query, variables = body.get("query", ""), body.get("variables") or {}
        selection = re.search(r"(?:items|keypair) \{(.*?)\}", query)
        fields = re.findall(r"\w+", selection.group(1)) if selection else []
        if "compute_session_list" in query:
            return 200, {"data": {"compute_session_list": self._session_list(variables, fields)}}
        if "keypair" in query:
            access_key = next(iter(self.keys))
            values = {"user_id": "user@example.com", "access_key": access_key, "secret_key": self.keys[access_key],
                      "is_active": True, "is_admin": False}
            return 200, {"data": {"keypair": {f: values.get(f) for f in fields}}}
        return 200, {"errors": [{"message": "Unknown query", "path": []}], "data": None}

    def _session_list(self, variables: dict, fields: list[str]) -> dict:
        statuses = set((variables.get("status") or "").split(","))
        m = re.fullmatch(r'\s*name\s*==\s*"([^"]*)"\s*', variables.get("filter") or "")
        chosen = [s for s in self.sessions if s.status in statuses and (m is None or s.name == m.group(1))]
        if (variables.get("order") or "") == "-created_at":
            chosen.reverse()
        offset, limit = variables.get("offset", 0), variables.get("limit", 20)
        items = [self._gql_item(s, fields) for s in chosen[offset:offset + limit]]
        return {"items": items, "total_count": len(chosen)}

    def _gql_item(self, s: FakeSession, fields: list[str]) -> dict:
        """A ComputeSession as 23.09.11 models/session.py parse_row gives it (JSONString fields as strings)."""
        config = s.request.get("config") or {}
        values = {"id": s.id, "session_id": s.id, "name": s.name, "type": s.request.get("type", "").upper(),
                  "status": s.status, "status_info": s.status_info,
                  "status_data": json.dumps(s.status_data) if s.status_data is not None else None,
                  "result": s.result, "image": s.request.get("image"),
                  "cluster_size": s.request.get("clusterSize"), "mounts": list(config.get("mounts") or []),
                  "created_at": s.created_at, "terminated_at": s.terminated_at}
        values.update(s.shown_as)
        return {f: values.get(f) for f in fields}

    def _vfolder_path(self, vfolder: str, relpath: str) -> Path:
        if vfolder not in self.vfolders:
            raise ApiError(404, "object-not-found", "No such virtual folder.",
                           f"VFolder {vfolder} is not found or accessible.")
        root = self.vfolders[vfolder].resolve()
        path = (root / relpath).resolve()
        if root != path and root not in path.parents:
            raise ApiError(400, "invalid-api-params", "Missing or invalid API parameters.", "Not a relative path")
        return path

    def list_files(self, vfolder: str, body: dict):
        """GET /folders/{name}/files (23.09.11 api/vfolder.py list_files; a storage-proxy OSError
        comes back as InvalidAPIParameters with the proxy's msg and data)."""
        relpath = (body or {}).get("path", ".")
        path = self._vfolder_path(vfolder, relpath)
        if not path.is_dir():
            raise ApiError(400, "invalid-api-params", "Missing or invalid API parameters.",
                           "No such file or directory", {"errno": 2, "paths": [relpath]})
        files = []
        for item in sorted(path.iterdir()):
            st = item.stat()
            files.append({"filename": item.name, "size": st.st_size, "mode": stat.filemode(st.st_mode),
                          "ctime": st.st_ctime, "atime": 0, "mtime": st.st_mtime})
        for name, content in self.extra_entries.get(relpath, {}).items():
            files.append({"filename": name, "size": len(content), "mode": "-rw-r--r--", "ctime": 0, "atime": 0,
                          "mtime": datetime.now().timestamp()})
        return 200, {"items": [], "files": json.dumps(files)}

    def request_download(self, vfolder: str, body: dict):
        relpath = (body or {}).get("path", "")
        folder, _, name = relpath.partition("/")
        extra = self.extra_entries.get(folder, {})
        token = secrets.token_urlsafe(16)
        self.tokens[token] = extra[name] if name in extra else self._vfolder_path(vfolder, relpath)
        if relpath in self.stalled:
            self.tokens[token + "-stalls"] = True
        return 200, {"token": token, "url": f"{self.url}/download"}

    def storage_download(self, query: dict):
        token = (query.get("token") or [""])[0]
        path = self.tokens.get(token)
        if path is None:
            raise ApiError(401, "auth-failed", "Credential/signature mismatch.", "Invalid token")
        if isinstance(path, bytes):
            return 200, path
        if self.tokens.get(token + "-stalls"):   # half the file, then nothing until the manager closes
            data = path.read_bytes()
            return 200, Stream(len(data), lambda: self._stall(data[:len(data) // 2]))
        if not path.exists():
            raise ApiError(404, "storage/file-not-found", "File not found")
        if not path.is_file():
            raise ApiError(400, "invalid-api-params", "Missing or invalid API parameters.",
                           "The file is not a regular file.")
        return 200, path.read_bytes()

    def _stall(self, first: bytes):
        yield first
        self.closing.wait()


class _Handler(BaseHTTPRequestHandler):
    manager: FakeManager
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:   # quiet: the test output is the client's
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        parts = urlsplit(self.path)
        self.record = record = Recorded(self.command, self.path, dict(self.headers), body)
        with self.manager.lock:
            self.manager.requests.append(record)
        try:
            status, answer = self.manager.route(self, self.command, parts.path, parse_qs(parts.query), body)
        except ApiError as exc:
            status, answer = exc.status, exc.body
        record.status = status
        if isinstance(answer, Stream):
            self._stream(status, answer)
            return
        if isinstance(answer, bytes):
            payload, kind = answer, "application/octet-stream"
        else:
            payload = json.dumps(answer).encode()
            kind = "application/problem+json" if status >= 400 else "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, status: int, answer: Stream) -> None:
        self.send_response(status)
        self.send_header("Content-Type", answer.kind)
        self.send_header("Content-Length", str(answer.length))
        self.end_headers()
        try:
            for chunk in answer.chunks():
                self.wfile.write(chunk)
                self.wfile.flush()
                if answer is self.manager.greeting:
                    self.manager.greeting_sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):   # the reader stopped reading: what it should do
            pass
        self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PATCH = _handle
