"""billing_model

Runs supabase/migrations/20261121200000_billing_model.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200000"
down_revision = "20261121000000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
