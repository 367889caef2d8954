"""``saju-billing stack up|down|status``: the whole local system, wired to find each other.

The local database (with pg_cron and the net worker), the Toss sandbox and the billing service,
each its own process with a pid file and a log under ``<runtime dir>/stack``. The service's
keyring and doorbell token are generated once into ``stack/service.env`` (mode 0600) and kept,
so billing keys stored by one run open in the next. Local only: on a real deployment the service
runs under a process manager with its settings from the platform's secret store.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from service import db
from service.crypto import Keyring
from service.runtime import migrations, supervisor
from service.runtime.cluster import LocalRuntimeError, Runtime
from service.sandbox.merchants import DOCS_TEST_MERCHANT

# Toss's public docs test keys (the sandbox's default merchant); they move no money.
DOCS_CLIENT_KEY, DOCS_SECRET_KEY = DOCS_TEST_MERCHANT.split(":")[:2]
SANDBOX_PORT = int(os.environ.get("SAJU_SANDBOX_PORT", "8100"))
SERVICE_PORT = int(os.environ.get("SAJU_SERVICE_PORT", "8000"))


@dataclass(frozen=True)
class Stack:
    rt: Runtime

    @property
    def dir(self) -> Path:
        return self.rt.base_dir / "stack"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{SANDBOX_PORT}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{SERVICE_PORT}"

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.dir / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def service_env(self) -> dict[str, str]:
        """The service's settings, generated once and kept (the keyring must not change)."""
        path = self.dir / "service.env"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            values = {
                "SAJU_BILLING_KEYRING": f"local-1:{Keyring.generate_key()}",
                "SAJU_DOORBELL_TOKEN": secrets.token_urlsafe(32),
            }
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.writelines(f"{k}={v}\n" for k, v in values.items())
        stored = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {
            **stored,
            "SAJU_DATABASE_URL": self.rt.dsn(),
            "SAJU_TOSS_SECRET_KEY": DOCS_SECRET_KEY,
            "SAJU_TOSS_CLIENT_KEY": DOCS_CLIENT_KEY,
            "SAJU_TOSS_API_URL": self.sandbox_url,
            "SAJU_TOSS_SDK_URL": f"{self.sandbox_url}/v2/standard",
            "SAJU_PUBLIC_URL": self.service_url,
            # A local sandbox is not Toss's test environment: no need to hold back.
            "SAJU_RATE_PER_MINUTE": os.environ.get("SAJU_RATE_PER_MINUTE", "6000"),
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", *args],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
            )
        (self.dir / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def _wait_ready(self, url: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise LocalRuntimeError(f"{what} did not come up; see {self.dir}")

    def up(self) -> dict[str, object]:
        self.rt.start()
        supervisor.ensure_networker(self.rt)
        migrations.upgrade(self.rt.dsn())
        env = self.service_env()
        if self._pid("sandbox") is None:
            self._spawn(
                "sandbox",
                [
                    "sandbox",
                    "--port",
                    str(SANDBOX_PORT),
                    "--secret-key",
                    DOCS_TEST_MERCHANT,
                    "--no-rate-limit",
                    "--webhook-url",
                    f"{self.service_url}/webhooks/toss",
                ],
                {},
            )
        self._wait_ready(f"{self.sandbox_url}/v2/standard", "the Toss sandbox")
        if self._pid("service") is None:
            self._spawn("service", ["service", "--port", str(SERVICE_PORT)], env)
        self._wait_ready(f"{self.service_url}/readyz", "the billing service")
        with psycopg.connect(self.rt.dsn(), autocommit=True) as conn:
            db.run_sync(
                conn, db.ops_configure_doorbell(self.service_url, env["SAJU_DOORBELL_TOKEN"])
            )
        return self.status()

    def kill(self, name: str) -> int | None:
        """SIGKILL ``service`` or ``sandbox`` as a crash would (no shutdown, no cleanup); returns
        the pid that was killed. ``up()`` starts it again."""
        pid = self._pid(name)
        if pid is None:
            return None
        os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # started by up() in this process: reap it
        while self._pid(name) is not None:
            time.sleep(0.02)
        return pid

    def down(self) -> dict[str, object]:
        for name in ("service", "sandbox"):
            pid = self._pid(name)
            if pid is None:
                continue
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if self._pid(name) is None:
                    break
                time.sleep(0.1)
            else:
                os.killpg(pid, signal.SIGKILL)
            (self.dir / f"{name}.pid").unlink(missing_ok=True)
        supervisor.stop_networker(self.rt)
        self.rt.stop()
        return self.status()

    def status(self) -> dict[str, object]:
        return {
            "database": self.rt.dsn() if self.rt.status()["running"] else None,
            "sandbox": self.sandbox_url if self._pid("sandbox") else None,
            "service": self.service_url if self._pid("service") else None,
            "card_page": f"{self.service_url}/billing/cards/<customerKey>",
            "logs": str(self.dir),
        }


def main(action: str) -> int:
    stack = Stack(Runtime.from_env())
    result = {"up": stack.up, "down": stack.down, "status": stack.status}[action]()
    print(json.dumps(result, indent=2))
    return 0 if action != "status" or result["service"] else 3
