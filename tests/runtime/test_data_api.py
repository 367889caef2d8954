"""The runtime's own Data API, as ``db start`` runs it: ``db status`` gives a URL and keys that
work with the ``supabase`` client, and the supervisor keeps PostgREST and the gateway running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from postgrest.exceptions import APIError
from supabase.lib.client_options import SyncClientOptions

from service.runtime import supervisor
from service.runtime.api import DataApi
from service.runtime.cluster import ADMIN_USER, MAIN_DB, Runtime
from supabase import create_client


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def status(rt: Runtime) -> dict[str, Any]:
    proc = _cli("db", "status")
    assert proc.returncode == 0, proc.stderr
    state: dict[str, Any] = json.loads(proc.stdout)
    return state


def _up(url: str, key: str) -> httpx.Response | None:
    try:
        r = httpx.get(f"{url}/rest/v1/", headers={"apikey": key}, timeout=5)
    except httpx.TransportError:
        return None
    return r if r.status_code == 200 else None


def _eventually_up(url: str, key: str) -> httpx.Response:
    deadline = time.monotonic() + 30
    while (r := _up(url, key)) is None:
        if time.monotonic() > deadline:
            pytest.fail("the Data API did not answer")
        time.sleep(0.1)
    return r


def test_status_prints_a_url_and_keys_signed_with_the_local_secret(
    rt: Runtime, status: dict[str, Any]
) -> None:
    api = DataApi.from_env(rt)
    assert status["api_url"] == api.url
    assert status["rest_url"] == f"{api.url}/rest/v1"
    for role in ("anon", "service_role"):
        claims = jwt.decode(status[f"{role}_key"], api.jwt_secret, algorithms=["HS256"])
        assert claims["role"] == role
    r = _eventually_up(status["api_url"], status["anon_key"])
    assert r.json()["info"]["version"] == "12.0.2"


def test_the_gateway_wants_a_known_api_key(status: dict[str, Any]) -> None:
    _eventually_up(status["api_url"], status["anon_key"])
    missing = httpx.get(f"{status['rest_url']}/", timeout=5)
    assert (missing.status_code, missing.json()) == (
        401,
        {"message": "No API key found in request"},
    )
    forged = jwt.encode({"role": "anon", "exp": 1983812996}, "x" * 48, algorithm="HS256")
    wrong = httpx.get(f"{status['rest_url']}/", headers={"apikey": forged}, timeout=5)
    assert (wrong.status_code, wrong.json()) == (401, {"message": "Invalid API key"})
    elsewhere = httpx.get(f"{status['api_url']}/auth/v1/user", timeout=5)
    assert elsewhere.status_code == 404


def test_token_cli_creates_the_user_and_the_client_calls_through(
    rt: Runtime, status: dict[str, Any]
) -> None:
    email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    proc = _cli("token", "--user", email)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    claims = jwt.decode(
        token, DataApi.from_env(rt).jwt_secret, algorithms=["HS256"], audience="authenticated"
    )
    assert claims["email"] == email
    with psycopg.connect(rt.dsn(MAIN_DB, ADMIN_USER)) as conn:
        row = conn.execute("select id::text from auth.users where email = %s", (email,)).fetchone()
    assert row == (claims["sub"],)
    _eventually_up(status["api_url"], status["anon_key"])
    # The main database may not be migrated: an unknown function is PostgREST's own 404 error,
    # which proves the URL, the key and the token reached PostgREST as that user.
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=30) as http:
        options = SyncClientOptions(headers=headers, httpx_client=http)
        c = create_client(status["api_url"], status["anon_key"], options=options)
        with pytest.raises(APIError) as exc:
            c.schema("api").rpc("no_such_function_here", {}).execute()
    assert exc.value.code == "PGRST202"
    assert _cli("token", "--user", "not-a-user").returncode == 2


def _postgrest_pid(rt: Runtime) -> int | None:
    for pid in supervisor.owned_processes(rt):
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            continue
        if exe == "postgrest" and Path(f"/proc/{pid}").exists():
            return pid
    return None


def test_the_supervisor_restarts_a_killed_postgrest(rt: Runtime, status: dict[str, Any]) -> None:
    _eventually_up(status["api_url"], status["anon_key"])
    pid = _postgrest_pid(rt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _postgrest_pid(rt) in (None, pid):
        assert time.monotonic() < deadline, "PostgREST was not restarted"
        time.sleep(0.1)
    _eventually_up(status["api_url"], status["anon_key"])
