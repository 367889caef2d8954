"""billing_core

Runs supabase/migrations/20261121200100_billing_core.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200100"
down_revision = "20261121200000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
