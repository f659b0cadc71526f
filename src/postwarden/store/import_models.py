"""Contact imports and data sources (issue 20).

An import is a CSV body stored in the database (``import_chunks``, 1 MiB pieces, so
that every control process sharing the database can run it and nothing lives outside
its backups), processed in batches by one runner at a time. Each batch's contacts,
memberships, rejected rows and the import's cursor (``next_record``, counters, lease)
are committed in one transaction: a process killed mid-import resumes from the last
committed batch, never applying a batch twice.

A data source is a URL pulled on a schedule; each pull is an import of its own.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: An import's states as the API shows them. ``receiving`` (the body is still being
#: uploaded) is internal: such an import is not listed and not run.
IMPORT_STATES = ("queued", "running", "done", "failed", "cancelled")
RECEIVING = "receiving"
FINISHED = ("done", "failed", "cancelled")


class Import(Base):
    __tablename__ = "imports"
    __table_args__ = (
        Index("ix_imports_tenant_id_id", "tenant_id", "id"),
        # The runner's question: what is queued, or running with an expired lease.
        Index("ix_imports_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    data_source_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_sources.id", ondelete="SET NULL"), default=None, index=True
    )
    state: Mapped[str] = mapped_column(String(16))
    # mapping, on_conflict, dry_run, encoding, delimiter (control.imports checks them).
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of the body
    rows_total: Mapped[int | None] = mapped_column(default=None)  # once scanned
    header: Mapped[list[str] | None] = mapped_column(JSON, default=None)  # once scanned
    rows_done: Mapped[int] = mapped_column(default=0)
    rows_imported: Mapped[int] = mapped_column(default=0)
    rows_rejected: Mapped[int] = mapped_column(default=0)
    contacts_created: Mapped[int] = mapped_column(default=0)
    contacts_updated: Mapped[int] = mapped_column(default=0)
    # The resume cursor: CSV records consumed (the header and blank lines included).
    next_record: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)  # why it failed
    # Who runs it and until when (renewed with each batch): a runner that died lets
    # another take it over once the lease has passed.
    claimed_by: Mapped[str | None] = mapped_column(String(100), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class ImportChunk(Base):
    """One piece of an import's body, in order (deleted once the import ends)."""

    __tablename__ = "import_chunks"

    import_id: Mapped[int] = mapped_column(
        ForeignKey("imports.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ImportReject(Base):
    """A rejected row: its record number, the first column at fault, why, its cells."""

    __tablename__ = "import_rejects"

    import_id: Mapped[int] = mapped_column(
        ForeignKey("imports.id", ondelete="CASCADE"), primary_key=True
    )
    row: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    column_name: Mapped[str] = mapped_column(String(200), default="")
    reason: Mapped[str] = mapped_column(Text)
    cells: Mapped[list[str]] = mapped_column(JSON, default=list)


class DataSource(Base):
    """A CSV or JSON URL pulled every ``interval`` seconds into an import."""

    __tablename__ = "data_sources"
    __table_args__ = (
        Index("ix_data_sources_tenant_id_id", "tenant_id", "id"),
        Index("ix_data_sources_next_run_at", "next_run_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200), default="")
    url: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))  # csv | json
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)  # as an import's
    interval: Mapped[int] = mapped_column()  # seconds
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_run_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_import_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
