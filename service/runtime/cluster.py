"""The local Supabase-compatible PostgreSQL cluster: create, bootstrap, start, stop, reset.

Debian's PostgreSQL 15 has pg_cron but no pg_net, Vault, PostgREST or GoTrue, and there is no
Docker here. This module builds a cluster that looks to the product like a Supabase database:
Supabase's roles, an ``auth`` stub, and the ``net`` and ``vault`` SQL APIs (real extensions where
the server has them, the compatibility layer in ``supabase/local`` where it does not).

Databases in the cluster:

* ``supabase_base`` — a template holding only the bootstrap (what a fresh Supabase project has).
  pg_cron's catalog is installed in it, so every clone has the ``cron`` schema and
  ``cron.schedule`` works; pg_cron's launcher only runs jobs of ``cron.database_name``.
* ``postgres`` — the main database, cloned from ``supabase_base``; pg_cron runs its jobs. The
  demo and the service use it.
* per-test databases, cloned from a migrated template (see ``service.runtime.testdb``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

PG_BIN = Path(os.environ.get("SAJU_PG_BIN", "/usr/lib/postgresql/15/bin"))
ADMIN_USER = "supabase_admin"
# Supabase's local stack uses the same well-known password; the cluster listens on loopback only.
LOCAL_PASSWORD = "postgres"  # noqa: S105
BASE_DB = "supabase_base"
MAIN_DB = "postgres"
CRON_DB_DURING_BOOTSTRAP = BASE_DB
# Off in the fast mode the tests use (a disposable cluster); on in the durable mode, as Supabase
# runs them (WAL flushed at every commit), for the demo, benchmarks and chaos runs.
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")
# Supabase sizes Postgres' memory and WAL to the compute add-on. "local" keeps Postgres' defaults
# (the tests); "large" is the 2-core, 8 GB add-on a million-subscriber project would run, used by
# the benchmarks. The figures are those Supabase published for its instance sizes (not part of its
# documented API, so they may have moved since): measured costs are then not understated by a
# 128 MB buffer cache that no paid project has. max_connections stays the runtime's own.
COMPUTE_SIZES: dict[str, dict[str, str]] = {
    "local": {},
    "large": {
        "shared_buffers": "2GB",
        "effective_cache_size": "6GB",
        "maintenance_work_mem": "512MB",
        "work_mem": "10MB",
        "wal_buffers": "16MB",
        "min_wal_size": "1GB",
        "max_wal_size": "4GB",
        "checkpoint_completion_target": "0.9",
        "random_page_cost": "1.1",
        "effective_io_concurrency": "200",
    },
}


def project_root() -> Path:
    """The repository root: where ``supabase/`` lives."""
    env = os.environ.get("SAJU_PROJECT_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "supabase" / "local").is_dir() and (parent / "pyproject.toml").exists():
            return parent
    return Path.cwd()


def _postgres_can_reach(path: Path) -> bool:
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(path)]
    return subprocess.run(probe, check=False, capture_output=True).returncode == 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalRuntimeError(Exception):
    """The local runtime could not do what was asked; the message says why."""


# How long a clone waits for the last session in its template to leave. PostgreSQL itself waits
# 5 s before it gives up with "source database … is being accessed by other users"; a session
# that outlasts that (an autovacuum worker on a slow machine, a psql left open) is waited out.
CLONE_TIMEOUT_S = 60.0


def create_database(
    conn: psycopg.Connection[TupleRow],
    name: str,
    template: str,
    *,
    is_template: bool = False,
    timeout: float = CLONE_TIMEOUT_S,
) -> None:
    """``CREATE DATABASE name TEMPLATE template`` as ``postgres``'s, retried while another session
    is still in the template (SQLSTATE 55006), up to ``timeout`` seconds."""
    statement = sql.SQL("create database {} owner postgres template {} is_template {}").format(
        sql.Identifier(name), sql.Identifier(template), sql.Literal(is_template)
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute(statement)
            return
        except psycopg.errors.ObjectInUse as exc:
            if time.monotonic() > deadline:
                raise LocalRuntimeError(
                    f"cannot clone {template}: another session stays in it ({exc}); "
                    "close it (see pg_stat_activity) and try again"
                ) from exc
            time.sleep(0.5)


@dataclass(frozen=True)
class Runtime:
    """Where the local cluster lives and how to reach it."""

    root: Path
    base_dir: Path
    port: int
    host: str = "127.0.0.1"
    durable: bool = False
    compute: str = "local"

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_SIZES:
            raise LocalRuntimeError(
                f"SAJU_DB_COMPUTE must be one of {', '.join(COMPUTE_SIZES)}, not {self.compute!r}"
            )

    @classmethod
    def from_env(cls) -> Runtime:
        root = project_root()
        port = int(os.environ.get("SAJU_DB_PORT", "54322"))
        durable = os.environ.get("SAJU_DB_DURABLE", "") == "1"
        compute = os.environ.get("SAJU_DB_COMPUTE", "local")
        env_dir = os.environ.get("SAJU_RUNTIME_DIR")
        if env_dir:
            return cls(
                root=root, base_dir=Path(env_dir), port=port, durable=durable, compute=compute
            )
        base = root / ".local"
        if os.geteuid() == 0 and not _postgres_can_reach(root):
            # A checkout under a private directory (e.g. /root): keep the cluster where the OS
            # user postgres can reach it, one directory per checkout.
            digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
            base = Path("/var/tmp/saju-billing") / digest  # noqa: S108 - root-owned, per checkout
        return cls(root=root, base_dir=base, port=port, durable=durable, compute=compute)

    # --- paths -----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.base_dir / "postgres"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def local_sql_dir(self) -> Path:
        return self.root / "supabase" / "local"

    @property
    def stamp_file(self) -> Path:
        return self.data_dir / "saju_bootstrap.sha256"

    # --- connection strings ----------------------------------------------------------------
    def dsn(self, dbname: str = MAIN_DB, user: str = "postgres") -> str:
        return (
            f"postgresql://{user}:{LOCAL_PASSWORD}@{self.host}:{self.port}/{dbname}"
            "?application_name=saju-billing"
        )

    def connect(
        self, dbname: str = MAIN_DB, user: str = ADMIN_USER
    ) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(self.dsn(dbname, user), autocommit=True, connect_timeout=10)

    # --- process helpers -------------------------------------------------------------------
    def _as_postgres(self, argv: Sequence[str]) -> list[str]:
        # PostgreSQL refuses to run as root; the cluster belongs to the OS user "postgres".
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._as_postgres(argv), capture_output=True, text=True, check=False, timeout=300
        )
        if check and proc.returncode != 0:
            raise LocalRuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _prepare_dirs(self) -> None:
        for d in (self.base_dir, self.log_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base_dir, "postgres", "postgres")
            shutil.chown(self.log_dir, "postgres", "postgres")
            probe = subprocess.run(
                ["runuser", "-u", "postgres", "--", "test", "-w", str(self.base_dir)], check=False
            )
            if probe.returncode != 0:
                raise LocalRuntimeError(
                    f"the OS user 'postgres' cannot write {self.base_dir}; "
                    "set SAJU_RUNTIME_DIR to a directory it can reach"
                )

    # --- state -----------------------------------------------------------------------------
    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.is_initialized():
            return False
        proc = self._run([str(PG_BIN / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False)
        return proc.returncode == 0

    def bootstrap_hash(self) -> str:
        """Hash of everything the bootstrap installs; a change means the cluster is rebuilt."""
        h = hashlib.sha256()
        for f in sorted(self.local_sql_dir.rglob("*.sql")):
            h.update(f.relative_to(self.local_sql_dir).as_posix().encode())
            h.update(f.read_bytes())
        h.update(Path(__file__).read_bytes())
        return h.hexdigest()

    def is_current(self) -> bool:
        return self.stamp_file.exists() and self.stamp_file.read_text().strip() == (
            self.bootstrap_hash()
        )

    # --- lifecycle -------------------------------------------------------------------------
    def _write_conf(self, cron_database: str) -> None:
        conf = self.data_dir / "saju_runtime.conf"
        conf.write_text(
            "\n".join(
                [
                    "# Written by saju-billing's local runtime; edits are overwritten.",
                    "listen_addresses = '127.0.0.1'",
                    f"port = {self.port}",
                    "unix_socket_directories = '/tmp'",
                    # pg_stat_statements as on Supabase: the benchmarks read per-statement costs.
                    # plpgsql as on Supabase too: loaded once, not by each new session's first
                    # call (about 1.5 ms of every pg_cron run).
                    "shared_preload_libraries = 'pg_cron,pg_stat_statements,plpgsql'",
                    f"cron.database_name = '{cron_database}'",
                    # No libpq connection (and so no password) needed for job runs.
                    "cron.use_background_workers = on",
                    "cron.max_running_jobs = 8",
                    "max_worker_processes = 32",
                    "max_connections = 300",
                    "timezone = 'UTC'",
                    "log_timezone = 'UTC'",
                    "password_encryption = 'scram-sha-256'",
                    # Fast or durable: see DURABILITY_SETTINGS.
                    "include_if_exists 'saju_durability.conf'",
                    # Memory and WAL sized like a Supabase compute add-on: see COMPUTE_SIZES.
                    "include_if_exists 'saju_compute.conf'",
                    "logging_collector = off",
                    # pg_net's GUCs, read by the local net worker.
                    "pg_net.batch_size = 200",
                    "pg_net.ttl = '6 hours'",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            shutil.chown(conf, "postgres", "postgres")
        self._write_durability()
        self._write_compute()
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if "include_if_exists 'saju_runtime.conf'" not in text:
            main_conf.write_text(text + "\ninclude_if_exists 'saju_runtime.conf'\n")

    def _write_durability(self) -> bool:
        """Writes this runtime's durability settings; returns whether they changed."""
        conf = self.data_dir / "saju_durability.conf"
        value = "on" if self.durable else "off"
        text = "".join(f"{name} = {value}\n" for name in DURABILITY_SETTINGS)
        if conf.exists() and conf.read_text() == text:
            return False
        conf.write_text(text)
        if os.geteuid() == 0:
            shutil.chown(conf, "postgres", "postgres")
        return True

    def _write_compute(self) -> bool:
        """Writes this runtime's compute size; returns whether it changed."""
        conf = self.data_dir / "saju_compute.conf"
        text = "".join(f"{k} = '{v}'\n" for k, v in COMPUTE_SIZES[self.compute].items())
        # No file is Postgres' defaults, the same as "local".
        if (conf.read_text() if conf.exists() else "") == text:
            return False
        conf.write_text(text)
        if os.geteuid() == 0:
            shutil.chown(conf, "postgres", "postgres")
        return True

    def _apply_durability(self, timeout: float = 30.0) -> None:
        """Switches a running cluster to this runtime's mode (all three settings reload live)."""
        if not self._write_durability():
            return
        want = "on" if self.durable else "off"
        deadline = time.monotonic() + timeout
        with self.connect(MAIN_DB) as conn:
            conn.execute("select pg_reload_conf()")
        while True:
            with self.connect(MAIN_DB) as conn:
                row = conn.execute("select current_setting('fsync')").fetchone()
            if row is not None and row[0] == want:
                return
            if time.monotonic() > deadline:
                raise LocalRuntimeError(f"the cluster did not switch fsync to {want}")
            time.sleep(0.1)

    def _pg_ctl(self, action: str) -> None:
        argv = [str(PG_BIN / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-t", "120"]
        if action in ("start", "restart"):
            argv += ["-l", str(self.log_dir / "postgres.log")]
        if action in ("stop", "restart"):
            argv += ["-m", "fast"]
        try:
            self._run(argv)
        except LocalRuntimeError as exc:
            raise LocalRuntimeError(f"{exc}\n--- log ---\n{self._log_tail()}") from exc

    def _initdb(self) -> None:
        self._prepare_dirs()
        pwfile = self.base_dir / "initdb.pw"
        pwfile.write_text(LOCAL_PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    ADMIN_USER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        # The Vault root key lives in a file beside the cluster, never in a table.
        key_file = self.data_dir / "vault_root.key"
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(key_file, "postgres", "postgres")

    def _run_sql_file(self, conn: psycopg.Connection[TupleRow], path: Path) -> None:
        try:
            conn.execute(path.read_text().encode())
        except psycopg.Error as exc:
            raise LocalRuntimeError(f"bootstrap file {path.name} failed: {exc}") from exc

    def _available(self, conn: psycopg.Connection[TupleRow], extension: str) -> bool:
        row = conn.execute(
            "select 1 from pg_available_extensions where name = %s", (extension,)
        ).fetchone()
        return row is not None

    def _bootstrap(self) -> None:
        """First start: roles, the base template, the main database (see module docstring)."""
        self._write_conf(cron_database=CRON_DB_DURING_BOOTSTRAP)
        self._pg_ctl("start")
        with self.connect("postgres") as conn:
            self._run_sql_file(conn, self.local_sql_dir / "00_roles.sql")
            conn.execute(
                sql.SQL("create database {} owner postgres template template0").format(
                    sql.Identifier(BASE_DB)
                )
            )
        with self.connect(BASE_DB) as conn:
            self._run_sql_file(conn, self.local_sql_dir / "10_base.sql")
            self._run_sql_file(conn, self.local_sql_dir / "20_auth.sql")
            # Real extensions win; the compatibility layer fills in only what is missing.
            if self._available(conn, "pg_net"):
                conn.execute("create extension if not exists pg_net with schema extensions")
            else:
                self._run_sql_file(conn, self.local_sql_dir / "30_net.sql")
            if self._available(conn, "supabase_vault"):
                conn.execute("create extension if not exists supabase_vault with schema vault")
            else:
                self._run_sql_file(conn, self.local_sql_dir / "40_vault.sql")
        # pg_cron's launcher stays connected to the database cron.database_name names, and a
        # database with a session in it cannot be cloned. So the launcher moves to the main
        # database (a restart: the setting is read at server start) before the base is cloned.
        self._write_conf(cron_database=MAIN_DB)
        self._pg_ctl("restart")
        with self.connect("template1") as conn:
            conn.execute(
                sql.SQL("alter database {} is_template true").format(sql.Identifier(BASE_DB))
            )
            conn.execute("drop database postgres with (force)")
            create_database(conn, MAIN_DB, template=BASE_DB)
        # The drop ended the launcher's session in initdb's database, and a launcher stopped that
        # way is not started again: a second restart brings it up in the clone.
        self._pg_ctl("restart")
        self.stamp_file.write_text(self.bootstrap_hash() + "\n")

    def start(self) -> None:
        """Create, bootstrap and start the cluster as needed; safe to call again and again."""
        if self.is_initialized() and not self.is_current():
            print("local runtime: bootstrap files changed; rebuilding the cluster", file=sys.stderr)
            self.destroy()
        if not self.is_initialized():
            self._initdb()
            self._bootstrap()
        elif not self.is_running():
            self._prepare_dirs()
            self._write_conf(cron_database=MAIN_DB)
            self._pg_ctl("start")
        self.wait_ready()
        if self._write_compute():
            # shared_buffers takes effect only at a start.
            self.restart()
        self._apply_durability()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect(MAIN_DB) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise LocalRuntimeError(
                        f"the cluster in {self.data_dir} does not accept connections on port "
                        f"{self.port} ({exc}); 'saju-billing db stop' then 'db start' restarts "
                        f"it\n--- log ---\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def _log_tail(self, lines: int = 15) -> str:
        log = self.log_dir / "postgres.log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.is_running():
            self._pg_ctl("stop")

    def restart(self, crash: bool = False) -> None:
        """Stops the cluster and starts it again. ``crash``: stop it the way a crash does (no
        shutdown checkpoint; the start runs crash recovery, which empties unlogged tables)."""
        if crash:
            argv = [str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data_dir), "-w", "-m"]
            self._run([*argv, "immediate"])
        else:
            self._pg_ctl("stop")
        self._pg_ctl("start")
        self.wait_ready()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def reset(self) -> None:
        """Throw the cluster away and build it again from scratch."""
        self.destroy()
        self.start()

    def status(self) -> dict[str, object]:
        return {
            "initialized": self.is_initialized(),
            "running": self.is_running(),
            "current": self.is_current() if self.is_initialized() else False,
            "data_dir": str(self.data_dir),
            "port": self.port,
            "url": self.dsn(),
        }

    def psql(self, args: Sequence[str], dbname: str = MAIN_DB, user: str = "postgres") -> int:
        env = dict(os.environ, PGPASSWORD=LOCAL_PASSWORD)
        argv = ["psql", "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname, *args]
        return subprocess.call(argv, env=env)
