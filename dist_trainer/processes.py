"""Servers detached from the terminal, each in a session of its own, and how to stop them.

`dist-trainer cluster up` starts its servers (the Ray head, the MLflow server, the service) with
`spawn` and records each with `record` (a pid with its start time) in its state file; `alive`,
`running` and `stop_session` later find that process, or every live process of its session, and
never mistake a reused pid (or another Ray's processes) for ours. Nothing here knows Ray or
MLflow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "alive",
    "free_port",
    "port_in_use",
    "record",
    "running",
    "spawn",
    "stop_session",
    "tail",
    "wait_http",
]


def record(pid: int) -> dict[str, Any]:
    """A pid with its start time: a later check never mistakes a reused pid for ours."""
    import psutil

    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def alive(record: dict[str, Any] | None) -> bool:
    import psutil

    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        return (
            abs(proc.create_time() - record["create_time"]) < 1e-3
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _session_is_ours(record: dict[str, Any]) -> bool:
    """Whether session id `record["pid"]` is still the one `cluster up` started.

    While any process of a session lives, the kernel does not hand its id out as a new pid
    (POSIX), so the id is ours unless a process with that pid exists and started at another time
    (then our session had ended entirely and the pid was reused).
    """
    import psutil

    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["create_time"]) < 1e-3
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _members(record: dict[str, Any] | None, marker: str | None = None) -> list[Any]:
    """The live processes of the session `cluster up` started a server in (none of them calls
    setsid), plus any whose command line names `marker` (the Ray temp dir) and their
    descendants (Ray's workers rename themselves `ray::...`)."""
    import psutil

    if not record:
        return []
    sid = record["pid"] if _session_is_ours(record) else None
    found: dict[int, Any] = {}
    named = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            in_session = sid is not None and os.getsid(proc.pid) == sid
            has_marker = bool(marker) and marker in " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if in_session or has_marker:
            found[proc.pid] = proc
        if has_marker:
            named.append(proc)
    for proc in named:
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    live = []
    for pid, proc in found.items():
        with contextlib.suppress(psutil.Error):
            if pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
    return live


def running(record: dict[str, Any] | None, marker: str | None = None) -> bool:
    return bool(_members(record, marker))


def stop_session(record: dict[str, Any] | None, marker: str | None, grace_s: float) -> int:
    """SIGTERM every live process of the recorded session, SIGKILL what is left after
    `grace_s`, then sweep again (a dying raylet may have started a worker meanwhile).
    Returns how many processes were signalled."""
    import psutil

    total = 0
    for attempt in range(3):
        members = _members(record, marker)
        if not members:
            break
        total += len(members)
        for proc in members:
            with contextlib.suppress(psutil.Error):
                if attempt == 0:
                    proc.terminate()
                else:
                    proc.kill()
        _, alive = psutil.wait_procs(members, timeout=grace_s if attempt == 0 else 5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def spawn(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A server detached from this terminal: its own session, stdin closed, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return True
        time.sleep(0.5)
    return False
