"""Shared fixtures: the local runtime (real PostgreSQL 15 + pg_cron) and a fresh database per test.

Environment: SAJU_RUNTIME_DIR and SAJU_DB_PORT choose the cluster (default ./.local, 54322).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from service.runtime import supervisor, testdb
from service.runtime.cluster import ADMIN_USER, BASE_DB, Runtime


@pytest.fixture(scope="session")
def rt() -> Runtime:
    """The local cluster, started (and bootstrapped) if needed, with the net worker running."""
    runtime = Runtime.from_env()
    runtime.start()
    supervisor.ensure_networker(runtime)
    testdb.sweep(runtime)
    return runtime


@pytest.fixture(scope="session")
def template(rt: Runtime) -> str:
    """A template database with every migration and the seed applied."""
    return testdb.migrated_template(rt)


@pytest.fixture
def dbname(rt: Runtime, template: str) -> Iterator[str]:
    """A freshly migrated database of this test's own, dropped afterwards."""
    name = testdb.clone(rt, template)
    yield name
    testdb.drop(rt, name)


@pytest.fixture
def base_dbname(rt: Runtime) -> Iterator[str]:
    """A database as a fresh Supabase project has it: bootstrap only, no migrations."""
    name = testdb.clone(rt, BASE_DB)
    yield name
    testdb.drop(rt, name)


@pytest.fixture
def conn(rt: Runtime, dbname: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Autocommit connection to the test database as ``postgres`` (not a superuser)."""
    with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as c:
        yield c


@pytest.fixture
def admin_conn(rt: Runtime, dbname: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Autocommit connection to the test database as the superuser ``supabase_admin``."""
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as c:
        yield c


@pytest.fixture
def base_conn(rt: Runtime, base_dbname: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Autocommit connection as ``postgres`` to a bootstrap-only database."""
    with psycopg.connect(rt.dsn(base_dbname, "postgres"), autocommit=True) as c:
        yield c
