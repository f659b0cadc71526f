"""Analytics rollups (issue 23; docs/decisions/0012, docs/analytics.md): counts of
events per hour, kept up to date as events arrive by one reader of ``events``
(``store.rollups``), so that no figure is ever computed by scanning events.

One row is one count: a tenant's ``scope`` (``tenant``, ``campaign``, ``domain``) and
``key`` (``""``, the campaign's id, the sending domain), broken down by ``dim`` and
``value`` (``""``/``""`` for the whole; ``site``, ``source``, ``domain``, ``variant``,
``category``, ``link``, ``client``, ``device``), for one UTC ``hour`` and one
``metric`` (an event type, or one derived from it: ``bounced_hard``, ``opened_unique``,
``ttd:60``, …). Tenant 0 holds the appliance's own totals (every tenant's), for the
operators' views.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from postwarden.store.models import Base


class StatHour(Base):
    __tablename__ = "stat_hours"
    # Retention prunes by hour (store.retention).
    __table_args__ = (Index(None, "hour"),)

    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    dim: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), primary_key=True)
    hour: Mapped[dt.datetime] = mapped_column(primary_key=True)
    metric: Mapped[str] = mapped_column(String(48), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class CampaignLink(Base):
    """A campaign's link by its index in the message, with the URL of its first click
    seen (``store.rollups``): what the per-link figures are shown with. It outlives the
    hits (``database.tracking_retention``)."""

    __tablename__ = "campaign_links"

    campaign_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    link_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    url: Mapped[str] = mapped_column(String(2000))
