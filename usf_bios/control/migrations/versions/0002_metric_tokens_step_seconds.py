"""metric points: tokens and step_seconds

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00

The engine's metric events carry the step's real (non-padding) tokens and its wall time; points written
before this revision keep NULL there.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('metric_points', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tokens', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('step_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('metric_points', schema=None) as batch_op:
        batch_op.drop_column('step_seconds')
        batch_op.drop_column('tokens')
