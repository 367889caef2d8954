"""vacuum_sooner

Runs supabase/migrations/20261203760000_vacuum_sooner.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203760000"
down_revision = "20261203750000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
