"""Cloning a template waits out a session still in it (the first bootstrap's race with pg_cron's
launcher, an autovacuum worker, a psql left open) instead of failing on the first try."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from service.runtime import testdb
from service.runtime.cluster import (
    BASE_DB,
    LocalRuntimeError,
    Runtime,
    create_database,
)


@pytest.fixture
def busy_template(rt: Runtime) -> Iterator[str]:
    """A template clone of the base, to hold a session in."""
    name = testdb.clone(rt, BASE_DB, prefix="test")
    with rt.connect("template1") as conn:
        conn.execute(f'alter database "{name}" is_template true'.encode())
    yield name
    testdb.drop(rt, name)


def _exists(rt: Runtime, name: str) -> bool:
    with rt.connect("template1") as conn:
        row = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
    return row is not None


@pytest.mark.slow
def test_a_clone_waits_for_the_last_session_in_its_template_to_leave(
    rt: Runtime, busy_template: str
) -> None:
    holder = psycopg.connect(rt.dsn(busy_template), autocommit=True)
    # PostgreSQL waits 5 s for other sessions before it refuses; this one stays longer.
    leaves = threading.Timer(7.0, holder.close)
    leaves.start()
    target = f"{busy_template}_copy"
    try:
        with rt.connect("template1") as conn:
            create_database(conn, target, template=busy_template)
        assert holder.closed
        assert _exists(rt, target)
    finally:
        leaves.cancel()
        holder.close()
        testdb.drop(rt, target)


@pytest.mark.slow
def test_a_clone_gives_up_with_a_clear_error_when_the_session_stays(
    rt: Runtime, busy_template: str
) -> None:
    target = f"{busy_template}_copy"
    with (
        psycopg.connect(rt.dsn(busy_template), autocommit=True),
        rt.connect("template1") as conn,
        pytest.raises(LocalRuntimeError) as refused,
    ):
        create_database(conn, target, template=busy_template, timeout=0)
    assert "another session stays in it" in str(refused.value)
    assert not _exists(rt, target)
