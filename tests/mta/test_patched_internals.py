"""The private parts of aiosmtpd, aiosmtplib and asyncio that Postwarden relies on.

``mta/wire.py``, ``mta/ingress.py``, ``lab/sink.py`` and ``mta/smtpclient_speedups.py``
reach past these libraries' public interfaces for speed and for the session rules
(pyproject.toml bounds their versions). When an upgrade moves one of these, this test
fails by name, instead of the appliance failing quietly (a DATA fast path that never
runs, a limit that no longer applies)."""

from __future__ import annotations

import asyncio
import inspect
import re
import warnings

import aiosmtpd.smtp
import aiosmtplib.protocol
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Session


async def test_asyncio_stream_reader_keeps_a_bytearray_buffer() -> None:
    # wire.read_data puts pipelined bytes back at the front of it.
    assert isinstance(asyncio.StreamReader()._buffer, bytearray)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name",
    [
        "_handle_client",  # GuardedSMTP: refuse over-limit sessions before the greeting
        "_call_handler_hook",
        "check_helo_needed",
        "check_auth_needed",
        "smtp_DATA",
        "smtp_EHLO",
        "smtp_AUTH",
        "auth_PLAIN",
        "auth_LOGIN",
        "push",
    ],
)
def test_aiosmtpd_methods_we_override_or_call(name: str) -> None:
    method = getattr(SMTP, name)
    assert inspect.iscoroutinefunction(method), name


def test_aiosmtpd_instance_state_we_read() -> None:
    source = inspect.getsource(SMTP)
    for attribute in ("self._tls_protocol", "self._reader", "self._smtp_methods",
                      "self._original_transport", "self.envelope"):  # fmt: skip
        assert attribute in source, attribute
    # The DATA fast path and the command counter replace these per instance.
    for name in ("_getaddr", "_authenticate", "_set_post_data_state", "connection_made",
                 "connection_lost"):  # fmt: skip
        assert callable(getattr(SMTP, name)), name
    # GuardedSMTP sets line_length_limit before calling __init__, which sizes the reader.
    assert "limit=self.line_length_limit" in inspect.getsource(SMTP.__init__)
    assert "self.transport" in inspect.getsource(SMTP._handle_client)
    session_words = set(re.findall(r"\w+", inspect.getsource(Session)))
    assert {"authenticated", "auth_data", "peer", "host_name", "ssl"} <= session_words
    assert {"success", "handled", "auth_data"} <= set(inspect.signature(AuthResult).parameters)
    assert hasattr(aiosmtpd.smtp, "MISSING") and callable(aiosmtpd.smtp.syntax)


async def test_aiosmtpd_builds_its_command_table_per_instance() -> None:
    class Handler:
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = SMTP(Handler(), loop=asyncio.get_running_loop())
    methods = server._smtp_methods
    assert isinstance(methods, dict) and {"EHLO", "MAIL", "RCPT", "DATA"} <= set(methods)
    assert server._tls_protocol is None


def test_aiosmtplib_data_passes_we_replace() -> None:
    # smtpclient_speedups swaps these module globals; DATA must still call them by name.
    assert callable(aiosmtplib.protocol.normalize_message_line_endings)
    assert aiosmtplib.protocol.PERIOD_REGEX.pattern == rb"(?m)^\."
    source = inspect.getsource(aiosmtplib.protocol.SMTPProtocol.execute_data_command)
    assert "normalize_message_line_endings(message)" in source
    assert 'PERIOD_REGEX.sub(b"..", message)' in source
