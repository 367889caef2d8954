"""tick_wakeup

Runs supabase/migrations/20261203790000_tick_wakeup.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203790000"
down_revision = "20261203780000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
