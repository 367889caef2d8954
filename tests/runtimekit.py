"""A runtime of a test module's own, for tests that run a whole ``saju-billing`` command (the demo,
chaos) through every process: its own directory, database, Data API, Toss sandbox and service
ports, beside the session's runtime, and the command line to drive it."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from liveserver import free_port
from psycopg.rows import dict_row

from service.runtime.cluster import Runtime
from service.sandbox.merchants import DOCS_TEST_MERCHANT

Row = dict[str, Any]
SECRET_KEY = DOCS_TEST_MERCHANT.split(":")[1]


@dataclass(frozen=True)
class OwnRuntime:
    env: dict[str, str]  # the environment that points the command line at this runtime
    runtime: Runtime

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``saju-billing <args>`` on this runtime."""
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=900,
            check=False,
        )

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SAJU_SANDBOX_PORT']}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SAJU_SERVICE_PORT']}"

    def rows(self, query: str, role: str | None = None) -> list[Row]:
        """The main database's rows, as ``postgres`` or as ``role``."""
        with psycopg.connect(self.runtime.dsn(), row_factory=dict_row) as conn:
            if role is not None:
                conn.execute(f"set role {role}".encode())
            return conn.execute(query.encode()).fetchall()

    def ledger(self) -> list[Row]:
        """What Toss (the sandbox) approved and cancelled, as the merchant reads it."""
        token = base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
        reply = httpx.get(
            f"{self.sandbox_url}/_sandbox/ledger", headers={"Authorization": f"Basic {token}"}
        )
        entries: list[Row] = reply.json()["entries"]
        return entries


@contextmanager
def own_runtime(name: str) -> Iterator[OwnRuntime]:
    """A fresh runtime, started (its first bootstrap) for the block, then stopped and removed."""
    # Under /var/tmp: the OS user postgres must reach the cluster's directory.
    base = Path("/var/tmp") / f"saju-{name}-{os.getpid()}"
    db_port = free_port()
    env = {
        **os.environ,
        "SAJU_RUNTIME_DIR": str(base),
        "SAJU_DB_PORT": str(db_port),
        "SAJU_API_PORT": str(free_port()),
        "SAJU_REST_PORT": str(free_port()),
        "SAJU_SANDBOX_PORT": str(free_port()),
        "SAJU_SERVICE_PORT": str(free_port()),
    }
    own = OwnRuntime(env, Runtime(root=Runtime.from_env().root, base_dir=base, port=db_port))
    try:
        started = own.cli("db", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield own
    finally:
        own.cli("stack", "down")
        own.cli("db", "stop")
        shutil.rmtree(base, ignore_errors=True)
