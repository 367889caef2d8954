"""foundation

Runs supabase/migrations/20261121000000_foundation.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261121000000"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
