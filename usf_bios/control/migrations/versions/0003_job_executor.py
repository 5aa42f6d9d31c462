"""jobs: the executor that runs each job and its handle there

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:00:00

The scheduler knows only the executor interface (control/executors/base.py); each job records which executor
started it (its gpu_config.executor, else USF_EXECUTOR at submit time), so a server restarted with another
default still follows the jobs it had, and the executor's handle of the job (the local executor's is
"<pid>:<process start time>", which the pid and pid_start_time columns held before; they are copied over).
Rows written before this revision ran on the local executor.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('executor', sa.String(length=20), nullable=False, server_default='local'))
        batch_op.add_column(sa.Column('handle', sa.String(length=255), nullable=True))
    op.execute("UPDATE jobs SET handle = CAST(pid AS VARCHAR(20)) || ':' || COALESCE(pid_start_time, '') "
               "WHERE pid IS NOT NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('pid_start_time')
        batch_op.drop_column('pid')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('pid_start_time', sa.String(length=32), nullable=True))
    op.execute("UPDATE jobs SET pid = CAST(substr(handle, 1, instr(handle, ':') - 1) AS INTEGER), "
               "pid_start_time = substr(handle, instr(handle, ':') + 1) WHERE executor = 'local' AND handle IS NOT NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('handle')
        batch_op.drop_column('executor')
