"""The README's deployment step ``DATABASE_URL=… alembic upgrade head``, run as a user runs it: the
``alembic`` command from the repository root (settings in pyproject.toml, no alembic.ini)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from service.runtime.cluster import Runtime, project_root

ROOT = project_root()
HEAD = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))[-1].name.split("_", 1)[0]


def test_alembic_upgrade_head_from_the_repository_root(rt: Runtime, base_dbname: str) -> None:
    alembic = Path(sys.executable).parent / "alembic"
    proc = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": rt.dsn(base_dbname)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with psycopg.connect(rt.dsn(base_dbname)) as conn:
        version = conn.execute("select version_num from alembic_version").fetchone()
        plans = conn.execute("select code from billing.plans").fetchall()
    assert version == (HEAD,)
    assert ("pro",) in plans
