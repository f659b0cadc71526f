"""A received message's body as text, for ``postwarden lab inbox`` and the lab's HTTP
view: the text/plain part, else the HTML part made readable by ``content.text`` (the
converter that writes a template's missing text part too). Display only; the bounce
parser has its own, capped converter (``bounces.parse.htmltext``)."""

from __future__ import annotations

import email.message
from collections.abc import Callable
from typing import Any

from postwarden.content.text import html_to_text

__all__ = ["body_text", "html_to_text"]


def body_text(message: email.message.Message) -> str:
    """The text/plain part, else the HTML part as rough text, else ``""``."""
    get_body: Callable[..., Any] | None = getattr(message, "get_body", None)
    if get_body is None:
        return ""
    try:
        part = get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
    except Exception:  # undecodable or malformed: show nothing rather than fail
        return ""
    if not isinstance(content, str):
        return ""
    if part.get_content_subtype() == "html":
        return html_to_text(content)
    return content.replace("\r\n", "\n")
