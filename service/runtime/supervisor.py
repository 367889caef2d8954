"""Keeps the pg_net-compatible worker running beside the local cluster.

``db start`` launches a detached supervisor; the supervisor runs the worker as a child process and
starts it again when it dies (as the postmaster restarts pg_net's background worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from service.runtime.cluster import Runtime


def _pidfile(rt: Runtime) -> Path:
    return rt.run_dir / "net-supervisor.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_supervisor(pid: int) -> bool:
    # After a reboot the pid in a stale pidfile may belong to an unrelated process.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"service.cli" in cmdline and b"supervise" in cmdline


def networker_pid(rt: Runtime) -> int | None:
    """The supervisor's pid if it is running."""
    try:
        pid = int(_pidfile(rt).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) and _is_supervisor(pid) else None


def ensure_networker(rt: Runtime) -> int:
    """Start the supervisor unless it already runs; returns its pid."""
    pid = networker_pid(rt)
    if pid is not None:
        return pid
    rt.run_dir.mkdir(parents=True, exist_ok=True)
    rt.log_dir.mkdir(parents=True, exist_ok=True)
    log = (rt.log_dir / "net-worker.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "supervise"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(rt.root),
        env={**os.environ, "SAJU_PROJECT_ROOT": str(rt.root)},
    )
    _pidfile(rt).write_text(f"{proc.pid}\n")
    return proc.pid


def stop_networker(rt: Runtime, timeout: float = 10.0) -> None:
    pid = networker_pid(rt)
    if pid is None:
        _pidfile(rt).unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    _pidfile(rt).unlink(missing_ok=True)


def supervise(rt: Runtime) -> None:
    """Run the worker, restarting it with a short backoff, until SIGTERM."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 0.5
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "service.cli", "net-worker"])
        code = child.wait()
        if stopping:
            break
        print(f"net worker exited with {code}; restarting", file=sys.stderr, flush=True)
        backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10.0)
        time.sleep(backoff)
