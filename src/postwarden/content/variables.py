"""The variables every send gives a template (a documented contract, docs/api.md
"Templates"), and the context a render gets.

* ``contact``: ``email``, ``name`` and ``attributes`` (by the tenant's declared
  attribute names: ``contact.attributes.plan``);
* ``unsubscribe_url``, ``preferences_url``, ``view_online_url``: links made for each
  recipient (previews and test sends get placeholders: :data:`PLACEHOLDER_URLS`);
* ``postal_address``: the tenant's ``settings.postal_address``;
* the template's own declared variables (by name), each with its sample value in
  previews.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The names every send provides, besides a template's declared variables.
CONTRACT = ("contact", "unsubscribe_url", "preferences_url", "postal_address", "view_online_url")
#: What ``contact`` has.
CONTACT_FIELDS = ("email", "name", "attributes")
#: The links of a preview or a test send (nobody's own): ``.invalid`` goes nowhere.
PLACEHOLDER_URLS = {
    "unsubscribe_url": "https://postwarden.invalid/unsubscribe/preview",
    "preferences_url": "https://postwarden.invalid/preferences/preview",
    "view_online_url": "https://postwarden.invalid/view/preview",
}
#: What a declared variable's name looks like (a Jinja name that is no contract name).
VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Names the sandbox provides itself (functions usable in any template).
BUILTINS = frozenset(("range", "dict", "namespace", "cycler", "joiner", "loop", "caller"))


def contact_values(
    email: str = "", name: str = "", attributes: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {"email": email, "name": name, "attributes": dict(attributes or {})}


def send_context(
    *,
    contact: Mapping[str, Any] | None,
    postal_address: str,
    samples: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    urls: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A render's variables: the declared variables' samples, the contract's values
    (``contact`` empty when there is none), then ``data`` on top (a ``contact`` in it
    is merged into the contact, its ``attributes`` into the attributes)."""
    out: dict[str, Any] = dict(samples or {})
    out.update(PLACEHOLDER_URLS if urls is None else urls)
    out["postal_address"] = postal_address
    person = contact_values(**(contact or {}))
    given = dict(data or {})
    extra = given.pop("contact", None)
    if isinstance(extra, Mapping):
        attrs = extra.get("attributes")
        person.update({k: v for k, v in extra.items() if k != "attributes"})
        if isinstance(attrs, Mapping):
            person["attributes"] = {**person["attributes"], **attrs}
    out.update(given)
    out["contact"] = person
    return out


def declared_names(variables: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(v["name"]) for v in variables]
