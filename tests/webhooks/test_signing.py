"""Standard Webhooks signatures, checked by the reference verifier (the
``standardwebhooks`` package, written by others) for ``v1`` and by the spec's
construction for ``v1a``; the retry schedule lasts more than a day."""

from __future__ import annotations

import base64
import datetime as dt
import random
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postwarden.webhooks import retry, signing


@settings(max_examples=50, deadline=None)
@given(body=st.binary(max_size=2000), msg=st.from_regex(r"evt_[0-9]{1,12}", fullmatch=True))
def test_every_secret_verifies_with_the_reference_library(body: bytes, msg: str) -> None:
    old, new = signing.new_secret(), signing.new_secret()
    key = signing.new_signing_key()
    now = int(time.time())
    header = signing.signature(msg, now, body, [new, old], key)
    headers = {"webhook-id": msg, "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (new, old):  # during a rotation, both verify
        Webhook(signing.secret_text(secret)).verify(body, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.secret_text(signing.new_secret())).verify(body, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.secret_text(new)).verify(body + b"x", headers, json_parse=False)
    # v1a: Ed25519 over the same content, under the public key the JWK names.
    (v1a,) = [s for s in header.split(" ") if s.startswith("v1a,")]
    jwk = signing.jwk(key, "k1")
    raw = base64.urlsafe_b64decode(jwk["x"] + "==")
    assert signing.public_text(key) == "whpk_" + base64.b64encode(raw).decode()
    public = Ed25519PublicKey.from_public_bytes(raw)
    content = f"{msg}.{now}.".encode() + body
    public.verify(base64.b64decode(v1a[4:]), content)
    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(v1a[4:]), content + b"x")


def test_an_old_timestamp_is_refused_by_the_verifier() -> None:
    """Why every try is signed at its own time, not the event's."""
    secret = signing.new_secret()
    then = int((dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)).timestamp())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(then),
        "webhook-signature": signing.signature("evt_1", then, b"{}", [secret]),
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.secret_text(secret)).verify(b"{}", headers)


def test_ids_that_would_change_the_signed_content_are_refused() -> None:
    for bad in ("evt.1", "evt 1", "evt\n1"):
        with pytest.raises(ValueError):
            signing.signature(bad, 0, b"", [b"s"])
    with pytest.raises(ValueError):
        signing.signature("evt_1", 0, b"", [])


def test_retries_last_more_than_a_day_with_jitter() -> None:
    rng = random.Random(7)
    delays = [retry.delay(n, rng) for n in range(1, len(retry.SCHEDULE) + 2)]
    assert delays[-1] is None and all(d is not None for d in delays[:-1])
    assert retry.total() > 24 * 3600
    spread = {round(retry.delay(1, random.Random(i)) or 0, 3) for i in range(20)}
    assert len(spread) > 10 and min(spread) >= 4.0 and max(spread) <= 6.0
    assert retry.delay(0) is None
