"""What the service benchmarks share: a database of their own, the sandbox and the service as real
processes, CPU and memory read from ``/proc``, ``pg_stat_statements``, and the result files.

CPU is read from ``/proc/<pid>/stat`` (utime + stime, and for the postmaster also cutime +
cstime, the CPU of backends that have already exited): the standard library is enough for that,
so no extra dependency. The Toss sandbox's own CPU is left out of every figure (it stands in for
Toss), the benchmark driver's too (it plays pg_cron and the clock).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import TupleRow

from service import db
from service.crypto import Keyring
from service.runtime import supervisor, testdb
from service.runtime.cluster import ADMIN_USER, LocalRuntimeError, Runtime
from service.sandbox.merchants import DOCS_TEST_MERCHANT

Conn = psycopg.Connection[TupleRow]

CLIENT_KEY, SECRET_KEY = DOCS_TEST_MERCHANT.split(":")[:2]
SANDBOX_PORT = int(os.environ.get("SAJU_SANDBOX_PORT", "8100"))
SERVICE_PORT = int(os.environ.get("SAJU_SERVICE_PORT", "8000"))
_TICKS = os.sysconf("SC_CLK_TCK")
# The Supabase compute size a million-subscriber project would run (see COMPUTE_SIZES).
BENCH_COMPUTE = "large"
_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    "max_connections",
    "shared_preload_libraries",
)
_PACKAGES = ("psycopg", "httpx", "starlette", "uvicorn", "aiolimiter", "pycurl")


# ------------------------------------------------------------------------------ /proc


def cpu_seconds(pid: int, with_exited_children: bool = False) -> float:
    """The process's user + system CPU, optionally with that of its reaped children."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14..17.
    used = int(fields[11]) + int(fields[12])
    if with_exited_children:
        used += int(fields[13]) + int(fields[14])
    return used / _TICKS


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds per process group at one instant."""

    service: float
    postgres: float
    net_worker: float

    def minus(self, earlier: CpuSample) -> CpuSample:
        return CpuSample(
            round(self.service - earlier.service, 3),
            round(self.postgres - earlier.postgres, 3),
            round(self.net_worker - earlier.net_worker, 3),
        )

    @property
    def total(self) -> float:
        return self.service + self.postgres + self.net_worker


def postmaster_pid(rt: Runtime) -> int:
    return int((rt.data_dir / "postmaster.pid").read_text().split()[0])


def net_worker_pids(rt: Runtime) -> list[int]:
    return [
        pid
        for pid in supervisor.owned_processes(rt)
        if b"net-worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ]


def sample_cpu(rt: Runtime, service_pid: int) -> CpuSample:
    """Service, every Postgres process (backends that ended included), the net worker."""
    pm = postmaster_pid(rt)
    postgres = cpu_seconds(pm, with_exited_children=True) + sum(
        cpu_seconds(pid) for pid in children(pm)
    )
    return CpuSample(
        service=cpu_seconds(service_pid, with_exited_children=True)
        + sum(cpu_seconds(pid) for pid in children(service_pid)),
        postgres=postgres,
        net_worker=sum(cpu_seconds(pid) for pid in net_worker_pids(rt)),
    )


# ------------------------------------------------------------------------------ statements


def statements_loaded(conn: Conn) -> bool:
    row = conn.execute("select current_setting('shared_preload_libraries')").fetchone()
    return row is not None and "pg_stat_statements" in str(row[0])


def reset_statements(conn: Conn) -> bool:
    """Creates the extension in this database and zeroes it; False when it is not loaded."""
    if not statements_loaded(conn):
        return False
    conn.execute("create extension if not exists pg_stat_statements with schema extensions")
    conn.execute("select extensions.pg_stat_statements_reset()")
    return True


def statement_times(conn: Conn, top: int = 12) -> dict[str, Any]:
    """Total execution time in this database since the reset, and the costliest statements;
    the superuser's own (the benchmark's polling) left out."""
    rows = conn.execute(
        """select s.query, s.calls, s.total_exec_time
             from extensions.pg_stat_statements s
             join pg_database d on d.oid = s.dbid
            where d.datname = current_database() and s.toplevel
              and s.userid <> (select oid from pg_roles where rolname = %s)
            order by s.total_exec_time desc""",
        (ADMIN_USER,),
    ).fetchall()
    total = sum(float(r[2]) for r in rows)
    return {
        "total_ms": round(total, 1),
        "top": [
            {"query": " ".join(str(r[0]).split())[:160], "calls": r[1], "ms": round(r[2], 1)}
            for r in rows[:top]
        ],
    }


# ------------------------------------------------------------------------------ processes


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Process(name, proc, log)


def wait_ready(process: Process, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise LocalRuntimeError(f"{process.name} exited; see {process.log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.1)
    raise LocalRuntimeError(f"{process.name} did not come up; see {process.log}")


@dataclass
class Bench:
    """A benchmark's database, and the sandbox and service processes pointed at it."""

    rt: Runtime
    dbname: str
    log_dir: Path
    keyring_spec: str
    doorbell_token: str
    sandbox_port: int = SANDBOX_PORT
    service_port: int = SERVICE_PORT
    sandbox: Process | None = None
    service: Process | None = None
    service_settings: dict[str, str] = field(default_factory=dict)

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def keyring(self) -> Keyring:
        return Keyring.parse(self.keyring_spec)

    def dsn(self, user: str = "postgres") -> str:
        return self.rt.dsn(self.dbname, user)

    def start_sandbox(self, rate_limit: int | None) -> Process:
        limit = ["--no-rate-limit"] if rate_limit is None else ["--rate-limit", str(rate_limit)]
        self.sandbox = spawn(
            "sandbox",
            [
                "sandbox",
                "--port",
                str(self.sandbox_port),
                "--secret-key",
                DOCS_TEST_MERCHANT,
                *limit,
            ],
            {},
            self.log_dir,
        )
        wait_ready(self.sandbox, f"{self.sandbox_url}/v2/standard")
        return self.sandbox

    def start_service(self, **settings: str) -> Process:
        self.service_settings = {
            "SAJU_DATABASE_URL": self.dsn(),
            "SAJU_TOSS_SECRET_KEY": SECRET_KEY,
            "SAJU_TOSS_CLIENT_KEY": CLIENT_KEY,
            "SAJU_TOSS_API_URL": self.sandbox_url,
            "SAJU_TOSS_SDK_URL": f"{self.sandbox_url}/v2/standard",
            "SAJU_PUBLIC_URL": self.service_url,
            "SAJU_BILLING_KEYRING": self.keyring_spec,
            "SAJU_DOORBELL_TOKEN": self.doorbell_token,
            "SAJU_WORKER_NAME": "bench",
            **settings,
        }
        self.service = spawn(
            "service",
            ["service", "--port", str(self.service_port)],
            self.service_settings,
            self.log_dir,
        )
        wait_ready(self.service, f"{self.service_url}/readyz")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            db.run_sync(conn, db.ops_configure_doorbell(self.service_url, self.doorbell_token))
        return self.service

    def toss(self) -> httpx.Client:
        return httpx.Client(base_url=self.sandbox_url, auth=(SECRET_KEY, ""), timeout=30)

    def stop(self) -> None:
        for process in (self.service, self.sandbox):
            if process is not None:
                process.stop()


@contextlib.contextmanager
def bench_database(durable: bool, ports: tuple[int, int] | None = None) -> Iterator[Bench]:
    """A migrated database of the benchmark's own, on the cluster in the mode asked for; the
    processes started on it are stopped and the database dropped afterwards. ``ports``: the
    sandbox's and the service's (default ``$SAJU_SANDBOX_PORT``, ``$SAJU_SERVICE_PORT``)."""
    import secrets

    # pg_stat_statements is preloaded by the runtime (as on Supabase); reset_statements reads it.
    with bench_runtime(durable) as rt:
        supervisor.ensure_networker(rt)
        dbname = testdb.clone(rt, testdb.migrated_template(rt), prefix="bench")
        bench = Bench(
            rt,
            dbname,
            rt.base_dir / "bench" / dbname,
            f"bench-1:{Keyring.generate_key()}",
            secrets.token_urlsafe(24),
            *(ports or (SANDBOX_PORT, SERVICE_PORT)),
        )
        try:
            yield bench
        finally:
            bench.stop()
            testdb.drop(rt, dbname)


@contextlib.contextmanager
def bench_runtime(durable: bool) -> Iterator[Runtime]:
    """The cluster in the mode asked for, sized as BENCH_COMPUTE; afterwards back to what the
    environment says (the tests' fast mode and Postgres' defaults, unless set otherwise)."""
    rt = replace(Runtime.from_env(), durable=durable, compute=BENCH_COMPUTE)
    rt.start()
    try:
        yield rt
    finally:
        Runtime.from_env().start()


def admin(bench: Bench) -> Conn:
    return psycopg.connect(bench.dsn(ADMIN_USER), autocommit=True)


# ------------------------------------------------------------------------------ results


def environment(conn: Conn, rt: Runtime, settings: Sequence[str] = _SETTINGS) -> dict[str, Any]:
    """Machine, versions, the given Postgres settings and the load average, for the result file."""
    meminfo = Path("/proc/meminfo")
    mem = meminfo.read_text().splitlines()[0] if meminfo.exists() else "unknown"
    versions = {}
    for package in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    row = conn.execute("select version()").fetchone()
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory": mem.split(":", 1)[-1].strip(),
            "python": sys.version.split()[0],
        },
        "versions": versions,
        "postgres": None if row is None else str(row[0]).split(" on ")[0],
        "durable_mode": rt.durable,
        "compute": rt.compute,
        "postgres_settings": {
            name: (r[0] if (r := conn.execute("select current_setting(%s)", (name,)).fetchone())
                   else None)
            for name in settings
        },
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


def write(
    out_dir: Path, name: str, results: dict[str, Any], text: Callable[[dict[str, Any]], str]
) -> Path:
    """``<out_dir>/<name>.json`` and ``<name>.txt`` (``text`` renders it); returns the JSON's
    path."""
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    (out_dir / f"{name}.txt").write_text(text(results))
    return path


def costliest(statements: dict[str, Any] | None, per: int) -> str:
    """The statements that took most of the database's time, per unit of work, for the notes."""
    if not statements or not per:
        return "statement times not collected"
    parts = []
    for t in statements["top"][:3]:
        name = t["query"].split("(")[0].removeprefix("select * from ").strip()
        parts.append(f"{name} {t['ms'] / per:.2f} ms per item ({t['calls']} calls)")
    return "; ".join(parts)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in rows)
