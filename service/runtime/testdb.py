"""Databases for tests: one migrated template per migration set, one fresh clone per test.

The template is created with ``IS_TEMPLATE true`` so neither pg_cron's launcher nor the net worker
ever connects to it (a connected template cannot be cloned).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from service.runtime import migrations
from service.runtime.cluster import BASE_DB, Runtime, create_database, pid_alive

_LOCK_KEY = 5472_2001  # advisory lock serialising template builds across test processes


def migrations_hash(rt: Runtime) -> str:
    h = hashlib.sha256(rt.bootstrap_hash().encode())
    for folder in (rt.root / "supabase" / "migrations", rt.root / "alembic" / "versions"):
        for f in sorted(folder.glob("*")):
            if f.suffix in (".sql", ".py"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    seed = rt.root / "supabase" / "seed.sql"
    if seed.exists():
        h.update(seed.read_bytes())
    return h.hexdigest()[:12]


def _exists(conn: psycopg.Connection[TupleRow], name: str) -> bool:
    return (
        conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone() is not None
    )


def clone(rt: Runtime, template: str, prefix: str = "test") -> str:
    """Create a fresh database from ``template``; returns its name."""
    # The creating process's pid is in the name, so a sweep leaves other live runs alone.
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with rt.connect("template1") as conn:
        create_database(conn, name, template=template)
    return name


def drop(rt: Runtime, name: str) -> None:
    with rt.connect("template1") as conn:
        _drop(conn, name)


def _drop(conn: psycopg.Connection[TupleRow], name: str) -> None:
    # PostgreSQL refuses to drop a database while it is marked as a template.
    if _exists(conn, name):
        conn.execute(sql.SQL("alter database {} is_template false").format(sql.Identifier(name)))
        conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def migrated_template(rt: Runtime) -> str:
    """The name of a template holding every migration and the seed; built once per change."""
    name = f"saju_tmpl_{migrations_hash(rt)}"
    with rt.connect("postgres") as lock_conn:
        lock_conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            with rt.connect("template1") as conn:
                if _exists(conn, name):
                    return name
                # Drop stale templates (other migration sets, half-built ones) so they do not
                # pile up.
                stale = conn.execute(
                    "select datname from pg_database where datname like 'saju\\_tmpl\\_%%'"
                ).fetchall()
                for (old,) in stale:
                    _drop(conn, str(old))
                building = f"{name}_building"
                create_database(conn, building, template=BASE_DB, is_template=True)
            migrations.upgrade(rt.dsn(building))
            seed = rt.root / "supabase" / "seed.sql"
            if seed.exists():
                migrations.run_sql_file(rt.dsn(building), seed)
            with rt.connect("template1") as conn:
                conn.execute(
                    sql.SQL("alter database {} rename to {}").format(
                        sql.Identifier(building), sql.Identifier(name)
                    )
                )
            return name
        finally:
            lock_conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))


def sweep(rt: Runtime, prefix: str = "test") -> None:
    """Drop test databases left behind by runs that ended (a concurrent run keeps its own)."""
    with rt.connect("template1") as conn:
        rows = conn.execute(
            "select datname from pg_database where datname like %s", (f"{prefix}\\_%",)
        ).fetchall()
        for (name,) in rows:
            owner = str(name).split("_")[1]
            if owner.isdigit() and pid_alive(int(owner)):
                continue
            _drop(conn, str(name))


def sql_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.sql") if p.is_file())
