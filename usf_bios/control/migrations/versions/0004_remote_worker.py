"""remote worker: the worker's submissions and the control plane's callback receipts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 02:00:00

``worker_submissions`` is the GPU worker's own store of what /training/submit accepted (a control plane leaves it
empty); ``callback_receipts`` holds the X-USF-Event-Id of every worker callback the control plane applied, so a
replayed callback changes nothing.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'worker_submissions',
        sa.Column('id', sa.String(length=160), primary_key=True),
        sa.Column('job_id', sa.String(length=160), nullable=False, unique=True),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('dataset_url', sa.Text(), nullable=False),
        sa.Column('callback_url', sa.Text(), nullable=True),
        sa.Column('dataset_sha256', sa.String(length=64), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('artifact_sha256', sa.String(length=64), nullable=True),
        sa.Column('artifact_size', sa.BigInteger(), nullable=True),
        sa.Column('callback_offset', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('callback_status', sa.String(length=20), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        'callback_receipts',
        sa.Column('event_id', sa.String(length=255), primary_key=True),
        sa.Column('job_id', sa.String(length=160), nullable=True),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_callback_receipts_received_at', 'callback_receipts', ['received_at'])


def downgrade() -> None:
    op.drop_index('ix_callback_receipts_received_at', table_name='callback_receipts')
    op.drop_table('callback_receipts')
    op.drop_table('worker_submissions')
