"""Every model module of the control database, imported: the metadata the Alembic
migrations are written against (``migrations/env.py``) and that the schema test
compares a migrated database with (``tests/control/test_schema.py``). A new model
module is imported here."""

from __future__ import annotations

from postwarden.store import (
    contact_models,  # noqa: F401  (registers its tables)
    import_models,  # noqa: F401
)
from postwarden.store.models import Base

metadata = Base.metadata
