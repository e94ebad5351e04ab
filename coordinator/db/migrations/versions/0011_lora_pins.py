"""The LoRAs and textual inversions an image result used.

Revision ID: 0011_lora_pins
Revises: 0010_worker_offers
Create Date: 2026-12-07

Adds `jobs.adapters`: a JSON list of protocol.loras.ResolvedAdapter (CivitAI version id and
SHA-256 of each LoRA and TI), signed by the worker that made the result; a verification
re-run of the job is pinned to them. NULL for jobs without LoRAs or TIs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_lora_pins"
down_revision: str | Sequence[str] | None = "0010_worker_offers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("adapters", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("adapters")
