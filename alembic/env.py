"""Alembic environment: each revision runs one SQL file from supabase/migrations, unchanged."""

from __future__ import annotations

import os

from sqlalchemy import create_engine, pool

from alembic import context

config = context.config


def _url() -> str:
    # `alembic upgrade head` from the repository root reads pyproject.toml and has no alembic.ini,
    # whose [alembic] section get_main_option would insist on: then DATABASE_URL says where.
    configured = config.file_config.has_section(config.config_ini_section)
    url = (configured and config.get_main_option("sqlalchemy.url")) or os.environ.get(
        "DATABASE_URL", ""
    )
    if not url:
        raise SystemExit("set DATABASE_URL (postgresql://…) or sqlalchemy.url")
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


if context.is_offline_mode():
    raise SystemExit(
        "offline mode is not supported: the SQL files in supabase/migrations are the script"
    )

engine = create_engine(_url(), poolclass=pool.NullPool)
with engine.connect() as connection:
    # One transaction per file, as the Supabase CLI runs them.
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
