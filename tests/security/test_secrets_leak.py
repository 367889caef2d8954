"""After a whole demo run through the real path (``saju-billing demo`` at a small size, on a
runtime of its own: database, net worker, Data API, Toss sandbox and service as processes), the
Toss secret key, every billing key and every authKey are found nowhere: not in a pg_dump of the
database, not in any log file of the runtime or the stack, not in the demo's own output and report,
not in the HTTP answers of the service (metrics included) or of the Data API.
"""

from __future__ import annotations

import base64
import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from runtimekit import SECRET_KEY, OwnRuntime, own_runtime

from service.crypto import Keyring
from service.runtime.api import DataApi
from service.runtime.cluster import ADMIN_USER
from service.runtime.signin import sign_in
from service.sandbox.app import MaskBillingKeys

# The sandbox's authKeys (as Toss's: "bln_" and 24 letters or digits).
AUTH_KEY = re.compile(r"bln_[A-Za-z0-9]{24}")
PG_DUMP = Path("/usr/lib/postgresql/15/bin/pg_dump")


@dataclass(frozen=True)
class Run:
    own: OwnRuntime
    out: Path
    stdout: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    out = tmp_path_factory.mktemp("demo")
    with own_runtime("security") as own:
        done = own.cli(
            "demo", "--subscribers", "8", "--months", "2", "--seed", "11",
            "--browser", "0", "--out", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        yield Run(own, out, done.stdout + done.stderr)


def billing_keys(run: Run) -> set[str]:
    """Every billing key the demo registered: opened from the database with the stack's keyring,
    and every key Toss (the sandbox) charged."""
    env_file = run.own.runtime.base_dir / "stack" / "service.env"
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    keyring = Keyring.parse(settings["SAJU_BILLING_KEYRING"])
    with psycopg.connect(run.own.runtime.dsn(user=ADMIN_USER)) as conn:
        sealed = conn.execute(
            "select billing_key_ciphertext, billing_key_key_id, customer_key"
            " from billing.payment_methods"
        ).fetchall()
    keys = {keyring.open(bytes(c), k, ck) for c, k, ck in sealed}
    charged = {e["billingKey"] for e in run.own.ledger()}
    assert charged <= keys  # the ledger knows no key the database lost
    return keys


def haystacks(run: Run) -> dict[str, str]:
    """Everything a person or a program could read afterwards, by where it came from."""
    found: dict[str, str] = {}
    dump = subprocess.run(
        [str(PG_DUMP), "--no-owner", run.own.runtime.dsn(user=ADMIN_USER)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found["pg_dump"] = dump.stdout
    base = run.own.runtime.base_dir
    logs = [p for p in base.rglob("*") if p.is_file() and (p.suffix == ".log" or "log" in p.parts)]
    assert {"postgres.log", "service.log", "sandbox.log"} <= {p.name for p in logs}
    for path in logs:
        found[str(path.relative_to(base))] = path.read_text(errors="replace")
    found["demo output"] = run.stdout
    for path in run.out.rglob("*"):
        if path.is_file():
            found[f"report {path.name}"] = path.read_text(errors="replace")
    for path in ("/metrics", "/readyz", "/healthz", "/openapi.json"):
        found[f"GET {path}"] = httpx.get(f"{run.own.service_url}{path}", timeout=30).text
    # What subscribers read back through the Data API (their card, payments, credits).
    rt, env = run.own.runtime, run.own.env
    api = DataApi.from_env(rt)
    api = DataApi(rt, api.dbname, int(env["SAJU_API_PORT"]), int(env["SAJU_REST_PORT"]),
                  api.state_dir)  # fmt: skip
    with psycopg.connect(rt.dsn(user=ADMIN_USER)) as conn:
        users = [r[0] for r in conn.execute("select distinct user_id from billing.customers")]
    assert users
    headers = {"apikey": api.anon_key, "Content-Profile": "api"}
    with httpx.Client(base_url=api.rest_url, timeout=30) as http:
        for user in users:
            token = sign_in(api, user).access_token
            for fn in ("my_subscription", "my_payments", "my_credits"):
                r = http.post(
                    f"/rpc/{fn}", json={}, headers={**headers, "Authorization": f"Bearer {token}"}
                )
                assert r.status_code == 200, r.text
                found[f"{user} {fn}"] = r.text
    return found


@pytest.mark.slow
def test_no_secret_is_found_anywhere_after_a_demo_run(demo: Run) -> None:
    keys = billing_keys(demo)
    assert len(keys) >= 8  # every subscriber registered a card at least once
    secrets = {
        "the Toss secret key": SECRET_KEY,
        "the Toss secret key as Basic auth": base64.b64encode(f"{SECRET_KEY}:".encode()).decode(),
    }
    for i, key in enumerate(sorted(keys)):
        secrets[f"billing key {i}"] = key
        # As it would stand in a URL or a JSON string with its padding escaped.
        secrets[f"billing key {i}, URL-encoded"] = key.replace("=", "%3D")
    leaks: list[tuple[str, str]] = []
    texts = haystacks(demo)
    for where, text in texts.items():
        leaks += [(what, where) for what, secret in secrets.items() if secret in text]
        leaks += [("an authKey", where) for _ in AUTH_KEY.finditer(text)]
    assert leaks == []
    # The search is not blind: the same texts do hold the things that may be there.
    assert "saju_charges" in texts["GET /metrics"]
    assert "billing.payment_methods" in texts["pg_dump"]
    assert "POST /v1/billing/****" in texts["stack/sandbox.log"]
    # And the authKey pattern is the sandbox's: one minted now matches it.
    token = base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
    minted = httpx.post(
        f"{demo.own.sandbox_url}/_sandbox/auth-keys",
        json={"customerKey": "ck_" + "0" * 32},
        headers={"Authorization": f"Basic {token}"},
    ).json()["authKey"]
    assert AUTH_KEY.fullmatch(minted)


def test_the_sandbox_access_log_masks_billing_keys_in_paths() -> None:
    mask = MaskBillingKeys()
    cases = {
        "/v1/billing/Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==": "/v1/billing/****",
        "/v1/billing/abc/def": "/v1/billing/****/def",
        "/v1/billing/authorizations/issue": "/v1/billing/authorizations/issue",
        "/v1/payments/tviva123": "/v1/payments/tviva123",
    }
    for path, logged in cases.items():
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5", "POST", path, "1.1", 200), None,
        )  # fmt: skip
        assert mask.filter(record) is True
        assert record.getMessage() == f'127.0.0.1:5 - "POST {logged} HTTP/1.1" 200'
