"""billing_scheduler

Runs supabase/migrations/20261121200500_billing_scheduler.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200500"
down_revision = "20261121200400"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
