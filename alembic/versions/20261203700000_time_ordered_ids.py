"""time_ordered_ids

Runs supabase/migrations/20261203700000_time_ordered_ids.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203700000"
down_revision = "20261203650000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
