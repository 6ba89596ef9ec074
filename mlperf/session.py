"""Backend.AI batch sessions from your own machine: `invoke session.create|status|logs|results|destroy`.

A batch session runs one startup command and ends when it finishes, and Backend.AI's idle checkers
leave batch sessions alone, so the benchmark runs for hours with no terminal, tunnel or SSH session
kept open. The startup command is `invoke all` from the image `invoke image` built, with every path
on the mounted vfolder (the rest of /home/work is scratch that goes with the session); the results
come back from the vfolder afterwards, when the session itself is gone.

This module is the session's lifecycle (create, status, logs, destroy); what is asked for is
mlperf.session_spec, and the results' download is mlperf.session_results.

It drives the user's own `backend.ai` CLI and never imports it: the client's release must match the
manager's and each release pins one Python minor, so it lives in its own environment. Credentials
stay in the client's configuration (BACKEND_* variables or the .env file it reads); no command line
made here holds them, and all the client prints passes through `redact` before it is shown.

The manager and its storage proxy are outside parties: every name they list that becomes a local
path passes mlperf.files.inside, every value of theirs in a message passes mlperf.files.shown, their
answers are checked for the types used, and every call to them is bounded (a timeout, or for
downloads a minimum rate), so a broken or hostile one costs an error line, never a hang or a file
written outside --results-dir.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
import time

from mlperf.errors import UserError
from mlperf.files import shown
from mlperf.backendai_cli import client_error, find_client, older_client, redact, run_client, said
from mlperf.session_spec import EXIT_MARK, Spec, check_name

ENDED = {"TERMINATED", "CANCELLED", "ERROR"}
NOT_STARTED = {"PENDING", "SCHEDULED", "PREPARING", "PULLING"}
INFO_FIELDS = "id,name,type,status,status_info,status_data,result,image,cluster_size,mounts,created_at,terminated_at"
CONSOLE_RETRIES = 6       # `logs --follow`: polls a console may fail in a row (a session between its end and TERMINATED)
STATUS_DATA_CAP = 1 << 20  # status_data is a small JSON document (scheduler retries, an error's repr)


def create(spec: Spec, *, dry_run: bool = False, client: str | None = None) -> None:
    """Create the batch session (or, dry run, print the client command and the spec)."""
    from mlperf.datasets import redact_url

    if dry_run:
        print(redact(redact_url(shlex.join(spec.argv()))))
        print(redact(json.dumps({"session": spec.as_request()}, indent=2)))
        print("dry run: nothing was created")
        return
    exe = find_client(client)
    print(f"creating batch session {spec.name} ({spec.nodes} node(s), {spec.gpus} GPU(s) each, {spec.image}); "
          f"waiting up to {spec.max_wait} s for it to start", flush=True)
    proc = run_client(exe, spec.argv(exe)[1:], timeout=spec.max_wait + 300)
    text = f"{proc.stdout}\n{proc.stderr}"
    if "server API version is higher than the client" in text:   # the client's own APIVersionWarning
        print(f"warning: {older_client()}", file=sys.stderr)
    if proc.returncode != 0:
        raise client_error(proc, "session create", name=spec.name, image=spec.image, vfolder=spec.vfolder)
    if "has an error during scheduling/startup or cancelled" in text:
        try:
            info = session_info(exe, spec.name)
        except UserError:
            info = None
        reason = _reason(info.get("status_data"), info.get("status_info")) if info else ""
        reason = reason or "error while scheduling or starting, or cancelled"
        advice = _start_advice(info.get("status_data")) if info else ""
        raise UserError(f"session {spec.name} failed to start ({reason}){advice}; "
                        f"`invoke session.status {spec.name}` shows it again")
    if "still on the job queue" in text or "enqueued for scheduling" in text:
        print(f"session {spec.name} is queued: it has not started within {spec.max_wait} s (not enough free "
              f"resources yet, or its image is still being pulled) and starts on its own; watch it with "
              f"`invoke session.status {spec.name}`, cancel it with `invoke session.destroy {spec.name}`")
        return
    state = "ended already" if "already terminated" in text else "started"
    print(f"session {spec.name} {state}; inside it runs: {spec.startup_command().split(';')[0]}\n"
          f"  follow it:       invoke session.logs {spec.name} --follow\n"
          f"  state, exit:     invoke session.status {spec.name}\n"
          f"  results, after:  invoke session.results {spec.name}   (from vfolder {spec.vfolder}, results/)")


def session_info(exe: str, name: str) -> dict | None:
    """The newest session of that name as `backend.ai ps` reports it (GraphQL), or None."""
    check_name(name)
    proc = run_client(exe, ["--output", "json", "ps", "--all", "--filter", f'name == "{name}"',
                            "--order=-created_at", "--limit", "1", "--format", INFO_FIELDS], timeout=60)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict) or "error" in answer:
        raise client_error(proc, "ps", name=name)
    items = answer.get("items") or []
    if not isinstance(items, list):
        raise _odd_answer(name, "items", items, "a list")
    return _checked_info(items[0], name) if items else None


# What `ps` gives for each field used here, by type; anything else is the manager's error, said in one line.
_INFO_TYPES = {"name": str, "type": str, "status": str, "status_info": str, "result": str, "image": str,
               "created_at": str, "terminated_at": str, "status_data": (str, dict), "cluster_size": int,
               "mounts": list}


def _checked_info(item, name: str) -> dict:
    if not isinstance(item, dict):
        raise _odd_answer(name, "the session", item, "a mapping")
    for key, kind in _INFO_TYPES.items():
        value = item.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _odd_answer(name, key, value, "a list" if kind is list else "a number" if kind is int else "text")
        if kind is list and value is not None and not all(isinstance(v, str) for v in value):
            raise _odd_answer(name, key, next(v for v in value if not isinstance(v, str)), "a list of names")
    return item


def _odd_answer(name: str, key: str, value, wanted: str) -> UserError:
    return UserError(f"the manager answered `backend.ai ps` for session {name} with {key} {shown(value)}, not "
                     f"{wanted}: it is not the Backend.AI manager this tool knows (check BACKEND_ENDPOINT), "
                     "or it is broken: tell its admin")


def known_session(exe: str, name: str) -> dict:
    """session_info of a session that exists; none of that name is an error line."""
    info = session_info(exe, name)
    if info is None:
        raise UserError(f"there is no session named {name}: `backend.ai ps --all` lists yours")
    return info


def console(exe: str, name: str) -> str:
    """The session's console (its main container's output; kept by the manager after it ends)."""
    proc = run_client(exe, ["session", "logs", name])
    if proc.returncode != 0:
        raise client_error(proc, "session logs", name=name)
    text = proc.stdout[:-1] if proc.stdout.endswith("\n") else proc.stdout   # the client adds one
    return redact(text)


def exit_code_in(text: str) -> int | None:
    codes = re.findall(rf"^{re.escape(EXIT_MARK)} (-?\d+)\s*$", text, re.M)
    return int(codes[-1]) if codes else None


def describe(info: dict, code: int | None) -> str:
    """A session's state in a line or two: what it is, where it stands, what the scheduler says."""
    name, state = said(info.get("name"), 64), said(info.get("status"), 40)
    what = f"{said(str(info.get('type', '')).lower(), 20)}, {info.get('cluster_size') or 1} node(s), " \
           f"{said(info.get('image'))}"
    mounts = [said(m, 64) for m in info.get("mounts") or [] if not str(m).startswith(".")]
    head = f"session {name} ({what}{', vfolder ' + ', '.join(mounts) if mounts else ''}): {state}"
    reason = _reason(info.get("status_data"), info.get("status_info"))
    if info.get("status") in ENDED:
        never = info.get("status_info") == "failed-to-start"
        exit_text = f"exit code {code}" if code is not None else "it never ran" if never else \
            "exit code unknown (no exit line in its console)"
        advice = _start_advice(info.get("status_data")) if never else ""
        return f"{head} at {said(info.get('terminated_at'), 40)}, result {said(info.get('result'), 20)}, " \
               f"{exit_text}" + (f" ({reason})" if reason else "") + \
               (f"\n  it never started{advice}" if advice else "")
    if info.get("status") in NOT_STARTED:
        return (f"{head}{': ' + reason if reason else ''}\n  it starts on its own when Backend.AI has the "
                f"resources; watch: invoke session.status {name}; cancel: invoke session.destroy {name}")
    return f"{head} since {said(info.get('created_at'), 40)}\n  follow it: invoke session.logs {name} --follow"


def _status_data(data) -> dict:
    """status_data as a mapping (GraphQL gives it as a JSON string), {} where it is not one."""
    if isinstance(data, str):
        try:
            data = json.loads(data) if len(data) <= STATUS_DATA_CAP else {}
        except (ValueError, RecursionError):
            data = {}
    return data if isinstance(data, dict) else {}


def _agent_errors(data) -> list[dict]:
    """The errors of a session that failed to start. 23.09's dispatcher stores convert_to_status_data
    of what start_session raised: {"error": {"src", "name", "repr", "collection": [one per agent's
    error]}} for the MultiAgentError it gets, whose own repr says only how many."""
    error = _status_data(data).get("error")
    if not isinstance(error, dict):
        return []
    found = [e for e in error.get("collection") or [] if isinstance(e, dict)] \
        if isinstance(error.get("collection"), list) else []
    return found or [error]


def _reason(data, info) -> str:
    data = _status_data(data)
    scheduler = data.get("scheduler") if isinstance(data.get("scheduler"), dict) else {}
    predicates = scheduler.get("failed_predicates")
    failed = [p.get("msg") or p.get("name") for p in predicates if isinstance(p, dict)] \
        if isinstance(predicates, list) else []
    errors = list(dict.fromkeys(said(e.get("repr") or e.get("name")) for e in _agent_errors(data)))   # once each
    messages = [said(m) for m in [info, *failed, scheduler.get("msg")] if m] + errors[:3]
    return "; ".join(messages) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")


def _start_advice(data) -> str:
    """What to do about a failed start, where the agent's error says it (else nothing)."""
    names = {e.get("name") for e in _agent_errors(data)}
    if "UnsupportedBaseDistroError" in names:
        return (": the agent runs only images whose ai.backend.base-distro label starts with ubuntu, centos or "
                "alpine; rebuild it with one of those, e.g. `invoke image --distro ubuntu22.04` for a Debian 12 "
                "base (its glibc 2.36 is at least the 2.35 that label promises)")
    return ": fix what the agent reports, then create the session again" if names else ""


def final_console(exe: str, name: str, state: str) -> str:
    """An ended session's console, or "" where there is none (a session cancelled before it ran)."""
    if state == "CANCELLED":
        return ""
    try:
        return console(exe, name)
    except UserError:
        return ""


def status(name: str, *, client: str | None = None) -> int:
    """Print the session's state; return its exit code once it ended (ended_code), else 0."""
    check_name(name)
    exe = find_client(client)
    info = known_session(exe, name)
    state = info.get("status")
    code = exit_code_in(final_console(exe, name, state)) if state in ENDED else None
    print(describe(info, code))
    return ended_code(info, code) if state in ENDED else 0


def ended_code(info: dict, code: int | None) -> int:
    """An ended session's exit code: the benchmark's where its console says it, else 0 for result
    SUCCESS and 1 otherwise (a session cancelled or never started)."""
    return code if code is not None else (0 if info.get("result") == "SUCCESS" else 1)


def logs(name: str, *, follow: bool = False, client: str | None = None, poll: float = 10,
         out=sys.stdout) -> int:
    """Print the session's console; --follow: keep printing what is new until it ends, then return its
    exit code (ended_code)."""
    check_name(name)
    exe = find_client(client)
    printed, waiting, misses = "", False, 0
    while True:
        info = known_session(exe, name)
        state = info.get("status")
        if state in NOT_STARTED:   # no container yet, so no console to ask for
            if not waiting or not follow:
                print(f"session {name} is {said(state)}: no console yet", file=sys.stderr, flush=True)
            waiting = True
            if not follow:
                return 0
        else:
            try:
                text = "" if state == "CANCELLED" else console(exe, name)
            except UserError:
                # 23.09 removes an ended session's containers before it calls the session TERMINATED, and
                # asks the agent for the console until then: 500 "No such container" for a moment. Asked
                # again after the next poll it answers, live or from what it kept.
                if follow and misses < CONSOLE_RETRIES:
                    misses += 1
                    time.sleep(poll)
                    continue
                if state not in ENDED:
                    raise
                text = ""
            misses = 0
            printed = _emit(printed, text, out)
            if not printed and state in ENDED:
                print(f"session {name} is {said(state)} and left no console", file=sys.stderr)
            if not follow:
                return 0
        if state in ENDED:
            code = exit_code_in(printed)
            print(describe(info, code), file=sys.stderr)
            return ended_code(info, code)
        time.sleep(poll)


def _emit(printed: str, text: str, out) -> str:
    """Write the part of `text` that follows what was printed already; the console is fetched whole
    each time, and one kept by the manager after the end may start later than the live one did."""
    if not text:
        return printed
    if text.startswith(printed):
        new = text[len(printed):]
    else:
        tail = printed[-2000:]
        at = text.rfind(tail) if tail else -1
        new = text[at + len(tail):] if at >= 0 else text
    out.write(new)
    out.flush()
    return text


def destroy(name: str, *, client: str | None = None) -> None:
    check_name(name)
    exe = find_client(client)
    proc = run_client(exe, ["session", "destroy", name])
    if proc.returncode != 0:
        raise client_error(proc, "session destroy", name=name)
    print(f"session {name}: terminated (what it wrote to its vfolder stays; invoke session.results {name})")
