"""lighter_audit

Runs supabase/migrations/20261203720000_lighter_audit.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203720000"
down_revision = "20261203710000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
