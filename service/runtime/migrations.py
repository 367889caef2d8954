"""Runs the SQL migrations through Alembic (one thin revision per file in supabase/migrations)."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from service.runtime.cluster import project_root

MIGRATION_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")


def migrations_dir() -> Path:
    return project_root() / "supabase" / "migrations"


def run_sql_file(dsn: str, path: Path) -> None:
    """Run one SQL file in one transaction, as the migration runners do."""
    with psycopg.connect(dsn) as conn:
        execute_file(conn, path)


def execute_file(conn: psycopg.Connection[TupleRow], path: Path) -> None:
    # One simple-protocol execute: the file's statements run as written, no parameter parsing.
    conn.execute(path.read_text().encode())


def _sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def upgrade(dsn: str, revision: str = "head") -> None:
    """``alembic upgrade head`` against ``dsn``."""
    from alembic.config import Config

    from alembic import command

    root = project_root()
    cfg = Config(toml_file=str(root / "pyproject.toml"))
    cfg.set_main_option("sqlalchemy.url", _sqlalchemy_url(dsn).replace("%", "%%"))
    command.upgrade(cfg, revision)


def sql_file_for(revision: str) -> Path:
    """The SQL file whose timestamp is ``revision``; exactly one must exist."""
    matches = [
        p for p in migrations_dir().glob(f"{revision}_*.sql") if MIGRATION_NAME.match(p.name)
    ]
    if len(matches) != 1:
        raise LookupError(f"expected one migration file for revision {revision}, found {matches}")
    return matches[0]


def run_revision(revision: str) -> None:
    """Body of every Alembic revision: run its SQL file through the raw driver connection."""
    from alembic import op

    driver = op.get_bind().connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError("alembic must run on psycopg 3 (postgresql+psycopg://)")
    execute_file(driver, sql_file_for(revision))
