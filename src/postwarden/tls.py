"""TLS material shared by the listeners: self-signed certificates and server contexts."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postwarden.config import Config, parse_hostport


def self_signed(
    names: Iterable[str], ips: Iterable[str] = (), *, days: int = 825
) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``names`` (the first is the CN) and ``ips``.

    Returns ``(cert PEM, unencrypted PKCS#8 key PEM)``; the caller stores the key
    with mode 0600. Good for opportunistic STARTTLS, where receivers do not verify.
    """
    names = list(names)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_expiry(cert_file: str) -> float:
    """notAfter of the first certificate in a PEM file (the one a server presents), as
    unix time. OSError or ValueError when it cannot be read."""
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.not_valid_after_utc.timestamp()


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) from PEM files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def ensure_tls_files(cfg: Config) -> tuple[str, str]:
    """The configured cert/key, or a self-signed pair generated on first start."""
    if cfg.smtp.tls_cert:
        return cfg.smtp.tls_cert, cfg.smtp.tls_key
    tls_dir = Path(cfg.spool.path).resolve().parent / "tls"
    cert, key = tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"
    if cert.exists() and key.exists():
        return str(cert), str(key)
    tls_dir.mkdir(parents=True, exist_ok=True)
    ips = []
    for spec in cfg.smtp.listen:
        host, _ = parse_hostport(spec, "smtp.listen")
        with contextlib.suppress(ValueError):
            ips.append(str(ipaddress.ip_address(host)))
    cert_pem, key_pem = self_signed([cfg.server.hostname], ips)
    with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(key_pem)
    cert.write_bytes(cert_pem)
    logging.getLogger("postwarden").info("event=tls_selfsigned cert=%s", cert)
    return str(cert), str(key)
