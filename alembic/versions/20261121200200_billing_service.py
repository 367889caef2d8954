"""billing_service

Runs supabase/migrations/20261121200200_billing_service.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200200"
down_revision = "20261121200100"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
