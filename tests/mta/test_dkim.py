"""DKIM signing, checked by dkimpy and by verifiers nobody here wrote (OpenDKIM, Mail::DKIM)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key

from postwarden.config import ConfigError, load_config
from postwarden.lab import Lab
from postwarden.mta.dkim import (
    DkimKeyError,
    DkimSigner,
    SigningKey,
    generate_key,
    load_key,
)
from tests.peers import require_binary

MSG = (
    b"From: Sender Name <news@Sender.test>\r\n"
    b"To: someone@inbox.test, other@inbox.test\r\n"
    b"Subject: Hello   with  spaces\r\n\tand a folded line\r\n"
    b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <abc@sender.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Not-Signed: 1\r\n"
    b"\r\n"
    b"Body line one  \r\n\r\nline three\r\n\r\n\r\n"
)


@pytest.fixture
def keys(tmp_path: Path) -> list[SigningKey]:
    out = []
    for algorithm, selector in (("rsa-sha256", "rsa1"), ("ed25519-sha256", "ed1")):
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(generate_key(algorithm))  # type: ignore[arg-type]
        out.append(load_key("sender.test", selector, path, algorithm))  # type: ignore[arg-type]
    return out


def dns_of(keys: list[SigningKey]) -> dict[bytes, bytes]:
    return {f"{k.selector}._domainkey.{k.domain}.".encode(): k.public_txt().encode() for k in keys}


def verify_all(message: bytes, keys: list[SigningKey]) -> list[bool]:
    txt = dns_of(keys)
    n = len(re.findall(rb"(?mi)^DKIM-Signature:", message))

    def one(i: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=i, dnsfunc=lambda q, **_: txt[q]))
        except dkim.ValidationError:  # dkimpy raises on a body hash mismatch
            return False

    return [one(i) for i in range(n)]


def sig_tags(header: bytes) -> dict[str, str]:
    flat = re.sub(rb"\s+", b"", header.split(b":", 1)[1]).decode()
    return dict(t.split("=", 1) for t in flat.split(";") if t)


def test_both_algorithms_sign_and_dkimpy_verifies(keys: list[SigningKey]) -> None:
    signer = DkimSigner(keys)
    sigs = signer.sign(MSG, "sender.test")
    headers = re.findall(rb"(?ms)^DKIM-Signature:.*?\r\n(?=\S|\Z)", sigs)
    assert len(headers) == 2
    tags = [sig_tags(h) for h in headers]
    assert [t["a"] for t in tags] == ["rsa-sha256", "ed25519-sha256"]
    for t in tags:
        assert t["c"] == "relaxed/relaxed" and t["d"] == "sender.test"
        signed = t["h"].split(":")
        for name in ("from", "to", "subject", "date", "message-id"):
            assert name in signed
        assert signed.count("from") == 2  # oversigned
        for name in ("subject", "to", "date", "message-id", "reply-to", "cc", "list-unsubscribe"):
            # once more than present: an added (or first) one breaks the signature
            assert signed.count(name) == MSG.lower().count(f"\n{name}:".encode()) + 1, name
        assert "x-not-signed" not in signed
    # Lines stay short (folded) and end with CRLF.
    assert all(len(line) <= 78 for line in sigs.split(b"\r\n"))
    assert sigs.endswith(b"\r\n") and b"\n" not in sigs.replace(b"\r\n", b"")
    assert verify_all(sigs + MSG, keys) == [True, True]


def test_tampering_breaks_the_signatures(keys: list[SigningKey]) -> None:
    signed = DkimSigner(keys).sign(MSG, "sender.test") + MSG
    assert verify_all(signed.replace(b"line three", b"line 3"), keys) == [False, False]
    # An added From, Subject, To, Reply-To or List-Unsubscribe is caught: oversigned.
    head, body = signed.split(b"\r\n\r\n", 1)
    for extra in (
        b"From: attacker@evil.test",
        b"Subject: urgent: wire money",
        b"To: victim@inbox.test",
        b"Reply-To: attacker@evil.test",
        b"List-Unsubscribe: <https://evil.test/u>",
    ):
        assert verify_all(head + b"\r\n" + extra + b"\r\n\r\n" + body, keys) == [False, False]
    # Relaxed canonicalization survives re-folding and whitespace changes in headers.
    refolded = signed.replace(b"Hello   with  spaces\r\n\tand", b"Hello with spaces and")
    assert verify_all(refolded, keys) == [True, True]


def test_only_the_signing_domains_keys_sign(keys: list[SigningKey]) -> None:
    """The signer reads no From: cleanup decides the domain and hands it over."""
    signer = DkimSigner(keys)
    assert signer.domains() == {"sender.test"}
    assert signer.sign(MSG, "elsewhere.test") == b""
    assert signer.sign(MSG, None) == b""
    assert DkimSigner([]).sign(MSG, "sender.test") == b""
    # Unparsable header: no signature rather than an exception.
    bad = b"From: a@sender.test\r\n\x01bad header\r\n\r\nbody\r\n"
    assert signer.sign(bad, "sender.test") == b""


def test_rsa_signature_matches_dkimpys_own_rsa(keys: list[SigningKey]) -> None:
    """OpenSSL's PKCS#1 v1.5 result equals dkimpy's pure-Python RSA over the same hash."""
    rsa_key = keys[0]
    pkcs1 = rsa_key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    h = hashlib.sha256(b"canonical header hash input")
    ours = rsa_key.sign_digest(h.digest())
    theirs = RSASSA_PKCS1_v1_5_sign(h, parse_pem_private_key(pkcs1))
    assert ours == theirs


def test_ed25519_seed_in_base64_as_dkimpy_writes_it(tmp_path: Path) -> None:
    pem = tmp_path / "ed.pem"
    pem.write_bytes(generate_key("ed25519-sha256"))
    key = load_key("sender.test", "ed1", pem, "ed25519-sha256")
    seed = key.private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw = tmp_path / "ed.key"
    raw.write_bytes(base64.b64encode(seed) + b"\n")
    same = load_key("sender.test", "ed1", raw, "ed25519-sha256")
    assert same.public_txt() == key.public_txt()
    # dkimpy signs with the seed file as is; our signature verifies with the same record.
    theirs = dkim.sign(MSG, b"ed1", b"sender.test", raw.read_bytes().strip(),
                       signature_algorithm=b"ed25519-sha256")  # fmt: skip
    assert verify_all(theirs + MSG, [key]) == [True]
    assert verify_all(DkimSigner([same]).sign(MSG, "sender.test") + MSG, [key]) == [True]


def test_load_key_checks_algorithm_and_config_names_the_path(tmp_path: Path) -> None:
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(generate_key("rsa-sha256"))
    with pytest.raises(DkimKeyError):
        load_key("d.test", "s", rsa_path, "ed25519-sha256")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(DkimKeyError):
        load_key("d.test", "s", junk, "rsa-sha256")
    from postwarden.appliance import build_signer

    cfg = load_config(
        None,
        environ={},
        overrides={
            "dkim": {"keys": [{"domain": "d.test", "selector": "s", "key_file": str(junk)}]}
        },
    )
    with pytest.raises(ConfigError, match=r"dkim\.keys\[0\]\.key_file"):
        build_signer(cfg)


def opendkim_conf(tmp_path: Path, keys: list[SigningKey]) -> Path:
    key_file = tmp_path / "test-keys"
    key_file.write_text(
        "".join(f"{k.selector}._domainkey.{k.domain} {k.public_txt()}\n" for k in keys)
    )
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {key_file}\n")
    return conf


def opendkim_verdict(opendkim: str, conf: Path, msg: Path) -> str:
    out = subprocess.run(
        [opendkim, "-x", str(conf), "-t", str(msg), "-vvv"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0, text
    return text


def test_opendkim_verifies_rsa_and_ed25519(keys: list[SigningKey], tmp_path: Path) -> None:
    opendkim = require_binary("opendkim")
    conf = opendkim_conf(tmp_path, keys)
    msg = tmp_path / "msg.eml"
    msg.write_bytes(DkimSigner(keys).sign(MSG, "sender.test") + MSG)
    text = opendkim_verdict(opendkim, conf, msg)
    assert re.search(r"dkim=pass [^;]*header\.a=rsa-sha256 header\.s=rsa1", text), text
    assert re.search(r"dkim=pass [^;]*header\.a=ed25519-sha256 header\.s=ed1", text), text
    # Negative control: the same verifier fails a tampered copy.
    msg.write_bytes(
        (DkimSigner(keys).sign(MSG, "sender.test") + MSG).replace(b"line three", b"line 3")
    )
    text = opendkim_verdict(opendkim, conf, msg)
    assert "dkim=fail" in text and "dkim=pass" not in text, text


MAIL_DKIM_SCRIPT = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS;
my ($host, $port, $file) = @ARGV;
my $res = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 0,
                                  retry => 1, udp_timeout => 5, tcp_timeout => 5);
Mail::DKIM::DNS::resolver($res);
open(my $fh, '<', $file) or die; binmode $fh;
my $v = Mail::DKIM::Verifier->new();
while (<$fh>) { s/\015?\012$/\015\012/; $v->PRINT($_); }
$v->CLOSE;
for my $sig ($v->signatures) { print $sig->algorithm, " ", $sig->result, "\n"; }
"""


async def test_mail_dkim_verifies_rsa_through_the_lab_dns(
    lab: Lab, keys: list[SigningKey], tmp_path: Path
) -> None:
    perl = require_binary("perl")
    probe = await asyncio.create_subprocess_exec(perl, "-MMail::DKIM::Verifier", "-e1")
    if await probe.wait() != 0:
        require_binary("mail-dkim-perl-module")  # skips locally, fails in CI
    for k in keys:
        lab.dns.add(f"{k.selector}._domainkey.{k.domain}", "TXT", k.public_txt())
    script = tmp_path / "verify.pl"
    script.write_text(MAIL_DKIM_SCRIPT)
    msg = tmp_path / "msg.eml"
    msg.write_bytes(DkimSigner(keys).sign(MSG, "sender.test") + MSG)
    host, port = lab.nameserver.rsplit(":", 1)

    async def run(path: Path) -> str:
        proc = await asyncio.create_subprocess_exec(
            perl, str(script), host, port, str(path),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return out.decode(errors="replace")

    text = await run(msg)
    assert "rsa-sha256 pass" in text, text
    tampered = tmp_path / "tampered.eml"
    tampered.write_bytes(msg.read_bytes().replace(b"line three", b"line 3"))
    text = await run(tampered)
    assert "rsa-sha256 fail" in text, text


@pytest.mark.parametrize("seed", range(60))
def test_relaxed_body_matches_dkimpy(seed: int) -> None:
    import random

    from postwarden.mta.dkim import relaxed_body

    rng = random.Random(seed)
    pieces = [b"a", b"b", b" ", b"\t", b"\r\n", b"  ", b"x y", b"\r\n\r\n", b"\r", b"\n"]
    body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)


async def test_async_signing_gives_the_same_signatures(keys: list[SigningKey]) -> None:
    signer = DkimSigner(keys)
    now = 1_795_000_000
    sync, async_ = (
        signer.sign(MSG, "sender.test", now=now),
        await signer.sign_async(MSG, "sender.test", now=now),
    )
    # Byte for byte the same: PKCS#1 v1.5 and Ed25519 are deterministic.
    assert sync == async_
    assert verify_all(async_ + MSG, keys) == [True, True]


def test_every_signed_header_present_still_verifies(keys: list[SigningKey], tmp_path: Path) -> None:
    """A long h= list is folded between names, never inside one (a regression: with
    the MIME headers of API-built mail, a fold split "content-transfer-encoding")."""
    from postwarden.mta.dkim import SIGNED_HEADERS

    head = b"".join(
        f"{name.title()}: value-of-{name}@sender.test\r\n".encode()
        for name in SIGNED_HEADERS
        if name != "from"
    )
    msg = b"From: <news@sender.test>\r\n" + head + b"\r\nbody\r\n"
    signed = DkimSigner(keys).sign(msg, "sender.test") + msg
    h_tag = re.search(rb"h=([^;]*);", signed.replace(b"\r\n", b"")).group(1)  # type: ignore[union-attr]
    names = [n.strip() for n in h_tag.split(b":")]
    assert all(n in {x.encode() for x in SIGNED_HEADERS} for n in names), names
    assert verify_all(signed, keys) == [True, True]
    opendkim = require_binary("opendkim")
    path = tmp_path / "all.eml"
    path.write_bytes(signed)
    text = opendkim_verdict(opendkim, opendkim_conf(tmp_path, keys), path)
    assert text.count("dkim=pass") == 2, text
