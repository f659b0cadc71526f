"""``Call.tenant_id`` refuses a call without a tenant by a real check, which holds
under ``python -O`` (an ``assert`` would vanish there and hand back None)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from postwarden.control.auth import Principal
from postwarden.control.errors import ApiError
from postwarden.control.routing import Call

PROBE = """
from postwarden.control.auth import Principal
from postwarden.control.errors import ApiError
from postwarden.control.routing import Call
operator = Principal(1, "pw_op", None, None, frozenset({"admin"}))
for principal in (None, operator):
    try:
        Call(request=None, ctx=None, principal=principal).tenant_id
    except ApiError as exc:
        print(exc.status)
"""


def test_tenant_id_of_a_tenant_key() -> None:
    p = Principal(1, "pw_x", 7, "acme", frozenset({"send"}))
    assert Call(request=None, ctx=None, principal=p).tenant_id == 7  # type: ignore[arg-type]


@pytest.mark.parametrize("tenant", [None, "operator"])
def test_no_tenant_is_refused(tenant: str | None) -> None:
    p = Principal(1, "pw_op", None, None, frozenset({"admin"})) if tenant else None
    with pytest.raises(ApiError) as err:
        Call(request=None, ctx=None, principal=p).tenant_id  # type: ignore[arg-type]  # noqa: B018
    assert err.value.status == 403


def test_no_tenant_is_refused_under_python_O() -> None:
    out = subprocess.run(
        [sys.executable, "-O", "-c", PROBE], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["403", "403"]
