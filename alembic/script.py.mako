"""${message}

Runs supabase/migrations/${up_revision}_<name>.sql unchanged.
"""

from service.runtime.migrations import run_revision

revision = "${up_revision}"
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_revision(revision)


def downgrade() -> None:
    raise NotImplementedError("migrations are forward-only")
