"""renewals_first

Runs supabase/migrations/20261203810000_renewals_first.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203810000"
down_revision = "20261203800000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
