"""The refiner setup a spot check's checker must have.

Revision ID: 0012_check_refiner
Revises: 0011_lora_pins
Create Date: 2026-12-07

Adds `jobs.check_refiner`: on a spot check of an SDXL txt2img job, the refiner setup of the
checked worker (protocol.refiner.refiner_setup: "none", or the refiner's SHA-256 and switch
point), which only a checker of the same setup may pop (coordinator.economy.checks). NULL
for every other job, and for the checks queued before: any checker, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_check_refiner"
down_revision: str | Sequence[str] | None = "0011_lora_pins"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("check_refiner", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("check_refiner")
