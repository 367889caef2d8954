"""The service as a real process, killed with SIGKILL while charges are in flight at Toss: the
next process heals everything on the next tick, and nothing is charged twice."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from dbkit import KEYRING as SEALING  # the key of loopkit's KEYRING spec
from dbkit import Billing, kst
from liveserver import LiveServer, free_port, wait_until
from loopkit import CLIENT_KEY, KEYRING, SECRET_KEY

from service import db
from service.runtime.cluster import Runtime
from service.sandbox.app import build_app as build_sandbox


class ServiceProcess:
    """``saju-billing service`` in a child process, configured through SAJU_* variables."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "service", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the service to be ready", 60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def sandbox() -> Iterator[LiveServer]:
    with LiveServer(
        build_sandbox(secret_keys=[f"{CLIENT_KEY}:{SECRET_KEY}"], rate_limit=None)
    ) as sb:
        yield sb


def _service(
    rt: Runtime, dbname: str, sandbox: LiveServer, tmp: Path, token: str
) -> ServiceProcess:
    port = free_port()
    env = {
        **os.environ,
        "SAJU_DATABASE_URL": rt.dsn(dbname, "postgres"),
        "SAJU_TOSS_SECRET_KEY": SECRET_KEY,
        "SAJU_TOSS_CLIENT_KEY": CLIENT_KEY,
        "SAJU_TOSS_API_URL": sandbox.url,
        "SAJU_TOSS_SDK_URL": f"{sandbox.url}/v2/standard",
        "SAJU_BILLING_KEYRING": KEYRING,
        "SAJU_DOORBELL_TOKEN": token,
        "SAJU_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "SAJU_POLL_S": "3600",
        "SAJU_RATE_PER_MINUTE": "10000",
        "SAJU_SHUTDOWN_GRACE_S": "1",
    }
    return ServiceProcess(env, port, tmp / "service.log")


def _approvals(sandbox: LiveServer) -> list[str]:
    auth = httpx.BasicAuth(SECRET_KEY, "")
    entries = httpx.get(f"{sandbox.url}/_sandbox/ledger", auth=auth).json()["entries"]
    return [e["orderId"] for e in entries if e["kind"] == "approval"]


@pytest.mark.slow
def test_sigkill_mid_drain_heals_on_the_next_tick_without_a_double_charge(
    bl: Billing, rt: Runtime, dbname: str, sandbox: LiveServer, tmp_path: Path
) -> None:
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    token = secrets.token_urlsafe(24)
    auth = httpx.BasicAuth(SECRET_KEY, "")
    # Five registered cards (billing keys issued at Toss, sealed as the service would).
    for i in range(5):
        reg = bl.api(f"k{i}", "begin_registration", "pro")
        ck = reg["customerKey"]
        auth_key = httpx.post(
            f"{sandbox.url}/_sandbox/auth-keys", json={"customerKey": ck}, auth=auth
        ).json()["authKey"]
        issued = httpx.post(
            f"{sandbox.url}/v1/billing/authorizations/issue",
            json={"authKey": auth_key, "customerKey": ck},
            auth=auth,
        ).json()
        sealed = SEALING.seal(issued["billingKey"], ck)  # as the service would seal it
        bl.run(db.service_complete_registration(ck, sealed, None))
    # Every charge is held at Toss until released: the drain is mid-flight when we kill.
    httpx.post(
        f"{sandbox.url}/_sandbox/faults", json={"endpoint": "charge", "kind": "hold"}, auth=auth
    )
    first = _service(rt, dbname, sandbox, tmp_path, token)
    first.start()
    try:
        db.run_sync(bl.owner, db.ops_configure_doorbell(first.url, token))
        bl.tick()  # the new process drains at start anyway; the ring is only a hint
        held = httpx.post(
            f"{sandbox.url}/_sandbox/faults/held", json={"count": 5}, auth=auth, timeout=20
        )
        assert held.status_code == 200, held.text
        first.kill()
    finally:
        first.stop()
    # Toss finishes the held charges although nobody is left to hear the answers.
    httpx.delete(f"{sandbox.url}/_sandbox/faults", auth=auth)
    httpx.post(f"{sandbox.url}/_sandbox/faults/release", auth=auth)
    wait_until(lambda: len(_approvals(sandbox)) == 5, "Toss to approve the held charges")
    assert bl.scalar("select count(*) from billing.charge_attempts where status = 'claimed'") == 5
    assert bl.scalar("select count(*) from billing.payments") == 0

    second = _service(rt, dbname, sandbox, tmp_path, token)
    second.start()
    try:
        db.run_sync(bl.owner, db.ops_configure_doorbell(second.url, token))
        bl.advance(timedelta(minutes=3))  # past the dead process's leases
        bl.tick()  # leases expire; the same requests go again under the same keys
        wait_until(
            lambda: (
                bl.scalar("select count(*) from billing.subscriptions where status = 'active'") == 5
            ),
            "the new process to heal every charge",
            90,
        )
    finally:
        second.stop()
    orders = _approvals(sandbox)
    assert len(orders) == len(set(orders)) == 5  # Toss replayed the approvals; none twice
    assert bl.scalar("select count(*) from billing.payments where applied") == 5
    assert bl.scalar("select sum(sends) from billing.charge_attempts") == 10
