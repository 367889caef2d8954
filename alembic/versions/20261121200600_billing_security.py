"""billing_security

Runs supabase/migrations/20261121200600_billing_security.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121200600"
down_revision = "20261121200500"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
