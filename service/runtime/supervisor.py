"""Keeps the local runtime's processes running beside the cluster.

``db start`` launches a detached supervisor; the supervisor runs each service as a child process
and starts it again when it dies (as the postmaster restarts pg_net's background worker, and as
Supabase's containers restart): the pg_net-compatible worker, and PostgREST plus its gateway when
they are installed.

Every process belongs to one runtime and says so on its command line (the runtime's run
directory), so ``status``, ``start`` and ``stop`` also find processes whose supervisor was killed
(SIGKILL leaves no chance to clean up): ``start`` and ``stop`` end such orphans, ``status`` lists
them. The worker also exits by itself when its supervisor is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from service.runtime.api import ApiNotInstalledError, DataApi
from service.runtime.cluster import LocalRuntimeError, Runtime, pid_alive

RUN_DIR_FLAG = "--run-dir"


def _pidfile(rt: Runtime) -> Path:
    return rt.run_dir / "net-supervisor.pid"


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_supervisor(pid: int) -> bool:
    # After a reboot the pid in a stale pidfile may belong to an unrelated process.
    cmdline = _cmdline(pid)
    return b"service.cli" in cmdline and b"supervise" in cmdline


def owned_processes(rt: Runtime) -> list[int]:
    """Pids of every process of this runtime (supervisor, worker, PostgREST, gateway)."""
    marker = str(rt.run_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        args = _cmdline(int(entry.name))
        if any(arg == marker or arg.startswith(marker + b"/") for arg in args):
            found.append(int(entry.name))
    return sorted(found)


def networker_pid(rt: Runtime) -> int | None:
    """The supervisor's pid if it is running."""
    try:
        pid = int(_pidfile(rt).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) and _is_supervisor(pid) else None


def worker_pid(rt: Runtime) -> int | None:
    """The pid of the supervisor's net worker child, if it is running."""
    sup = networker_pid(rt)
    if sup is None:
        return None
    workers = [p for p in owned_processes(rt) if _parent(p) == sup and b"net-worker" in _cmdline(p)]
    return workers[0] if workers else None


def orphans(rt: Runtime) -> list[int]:
    """Processes of this runtime that run without its supervisor."""
    sup = networker_pid(rt)
    return [pid for pid in owned_processes(rt) if pid != sup and _parent(pid) != sup]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _end(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ensure_networker(rt: Runtime) -> int:
    """Start the supervisor unless it already runs (ending orphans first); returns its pid."""
    pid = networker_pid(rt)
    if pid is not None:
        return pid
    _end(owned_processes(rt))
    rt.run_dir.mkdir(parents=True, exist_ok=True)
    rt.log_dir.mkdir(parents=True, exist_ok=True)
    _pidfile(rt).unlink(missing_ok=True)
    # setsid -f detaches the supervisor (new session, not our child); it writes its own pidfile.
    with (rt.log_dir / "net-worker.log").open("ab") as log:
        subprocess.run(
            ["setsid", "-f", sys.executable, "-m", "service.cli", "supervise",
             RUN_DIR_FLAG, str(rt.run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(rt.root),
            env={**os.environ, "SAJU_PROJECT_ROOT": str(rt.root)},
            check=True,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while (pid := networker_pid(rt)) is None:
        if time.monotonic() > deadline:
            raise LocalRuntimeError(f"the supervisor did not start; see {rt.log_dir}")
        time.sleep(0.05)
    return pid


def stop_networker(rt: Runtime, timeout: float = 10.0) -> None:
    """Stop the supervisor and its children, and any orphan of this runtime."""
    pid = networker_pid(rt)
    if pid is not None:
        _end([pid], timeout)
    _end(owned_processes(rt), timeout)
    _pidfile(rt).unlink(missing_ok=True)


@dataclass
class _Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0


def _services(rt: Runtime) -> list[_Child]:
    children = [
        _Child("net worker", [sys.executable, "-m", "service.cli", "net-worker",
                              RUN_DIR_FLAG, str(rt.run_dir)]),
    ]  # fmt: skip
    api = DataApi.from_env(rt)
    try:
        api.check_installed()
    except ApiNotInstalledError as exc:
        print(f"data API not started: {exc}", file=sys.stderr, flush=True)
        return children
    api.write_configs()
    children += [_Child(name, argv) for name, argv in api.commands().items()]
    return children


def supervise(rt: Runtime) -> None:
    """Run every service, restarting each with a short backoff, until SIGTERM."""
    stopping = False
    _pidfile(rt).write_text(f"{os.getpid()}\n")
    children = _services(rt)

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stopping:
        now = time.monotonic()
        for child in children:
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                print(f"{child.name} exited with {code}; restarting", file=sys.stderr, flush=True)
                lived = now - child.started
                child.backoff = 0.5 if lived > 30 else min(child.backoff * 2, 10.0)
                child.restart_at = now + child.backoff
                child.proc = None
            if child.proc is None and now >= child.restart_at:
                child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL)
                child.started = now
        time.sleep(0.2)
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.terminate()
    for child in children:
        if child.proc is not None:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
