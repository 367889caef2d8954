"""cheaper_webhook_ingest

Runs supabase/migrations/20261203710000_cheaper_webhook_ingest.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203710000"
down_revision = "20261203650000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
