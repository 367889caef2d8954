"""service_contract

Runs supabase/migrations/20261203100000_service_contract.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203100000"
down_revision = "20261203090000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
