"""hot_room

Runs supabase/migrations/20261203800000_hot_room.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203800000"
down_revision = "20261203790000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
