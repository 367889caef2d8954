"""cached_probe

Runs supabase/migrations/20261203740000_cached_probe.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "20261203740000"
down_revision = "20261203730000"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
