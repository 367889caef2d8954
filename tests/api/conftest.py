"""The Data API as subscribers reach it: the real PostgREST behind the gateway, per test module.

Each module gets its own migrated database and its own PostgREST + gateway pair (free ports), so
calls through the ``supabase`` client hit exactly the database the test inspects.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from liveserver import free_port

from service.runtime import testdb
from service.runtime.api import DataApi
from service.runtime.cluster import Runtime
from service.runtime.signin import SignedIn, sign_in


@pytest.fixture(scope="module")
def api_dbname(rt: Runtime, template: str) -> Iterator[str]:
    name = testdb.clone(rt, template)
    yield name
    testdb.drop(rt, name)


@pytest.fixture(scope="module")
def data_api(
    rt: Runtime, api_dbname: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataApi]:
    """PostgREST and the gateway serving ``api_dbname``, as ``db start`` runs them."""
    api = DataApi(rt, api_dbname, free_port(), free_port(), tmp_path_factory.mktemp("data-api"))
    api.check_installed()
    api.write_configs()
    log = (api.state_dir / "processes.log").open("ab")
    procs = [
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        for argv in api.commands().values()
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{api.rest_url}/", headers={"apikey": api.anon_key}, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Data API did not come up")
            time.sleep(0.1)
        yield api
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        log.close()


@pytest.fixture
def user(data_api: DataApi) -> SignedIn:
    return sign_in(data_api, f"u{time.monotonic_ns()}@example.com")
