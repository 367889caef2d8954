"""billing_api

Runs supabase/migrations/20261121200400_billing_api.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200400"
down_revision = "20261121200300"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
