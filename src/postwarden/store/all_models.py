"""Every model module of the control database, imported: the metadata the Alembic
migrations are written against (``migrations/env.py``) and that the schema test
compares a migrated database with (``tests/control/test_schema.py``). A new model
module is imported here."""

from __future__ import annotations

from postwarden.store import (  # noqa: F401  (each registers its tables)
    analytics_models,
    audience_models,
    campaign_models,
    contact_models,
    engagement_models,
    import_models,
    template_models,
    webhook_models,
)
from postwarden.store.models import Base

metadata = Base.metadata
