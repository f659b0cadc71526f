"""The control-plane fixtures (SQLite and PostgreSQL) for the bounce tests."""

from tests.control.conftest import control  # noqa: F401  (the fixture)
from tests.pg import postgres  # noqa: F401  (the fixture)
