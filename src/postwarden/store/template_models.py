"""Templates and their versions (issue 20).

A template is a tenant's named piece of mail (unique name per tenant, a category);
its content lives in versions, which are never changed: every change of content
writes a new version, and the template points at its current one
(``current_version_id``, kept by ``control.templates``; no foreign key, so that the
two tables do not refer to each other). Sends record the version they used.
Deleting a template deletes its versions.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base, BigId, utcnow

#: What a template is for: marketing mail must carry an unsubscribe link and a postal
#: address (``content.lint``).
TEMPLATE_CATEGORIES = ("transactional", "marketing", "other")


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(16))  # one of TEMPLATE_CATEGORIES
    current_version_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TemplateVersion(Base):
    """One version of a template's content, as it was saved (never updated)."""

    __tablename__ = "template_versions"
    __table_args__ = (UniqueConstraint("template_id", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per template
    subject: Mapped[str] = mapped_column(Text, default="")
    preheader: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text, default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)  # None: made from html
    # [{"name", "description", "sample"}]: the template's own variables.
    variables: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The visual builder's design JSON this version was compiled from, if any.
    design: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(16), default=None)  # key prefix
