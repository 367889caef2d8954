"""webhook_event_type

Runs supabase/migrations/20261203750000_webhook_event_type.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203750000"
down_revision = "20261203740000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
