"""jobs: a version per row, for optimistic concurrency

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 07:00:00

SQLAlchemy bumps ``version`` on every UPDATE of a job and adds ``WHERE version = <the one read>``: a write from a
session that read the row before another writer committed fails instead of overwriting that write. Before this,
a cancel of a queued job that landed while the scheduler was starting it was overwritten by the start, and the
job ran on as if never cancelled. Existing rows start at 1.
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('version', sa.Integer(), nullable=False, server_default='1'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('version')
