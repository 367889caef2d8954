"""set_based_renewal

Runs supabase/migrations/20261203600000_set_based_renewal.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203600000"
down_revision = "20261203500000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
