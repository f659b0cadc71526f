"""One typed configuration object, loaded from TOML with ``POSTWARDEN_*`` overrides.

The file is optional: every key has an embedded default so ``postwarden serve`` with
no file runs. Unknown keys and bad values are refused at load time with the key's
dotted path (``smtp.listen[1]: ...``), never silently ignored.

Environment overrides use a double underscore between path parts:
``POSTWARDEN_SMTP__LISTEN='["0.0.0.0:587"]'``, ``POSTWARDEN_DELIVERY__MX_PORT=2526``.
The value is read as a TOML value when it parses as one, else as a plain string.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ENV_PREFIX = "POSTWARDEN_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names its path."""


# Markers carried in dataclass field metadata to parse human units.
_DURATION = {"unit": "duration"}
_SIZE = {"unit": "size"}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}  # fmt: skip


def parse_duration(value: object, path: str = "duration") -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"30s"``, ``"5m"``, ``"5d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f'{path}: expected a duration like 30, "30s", "5m", "5d"; got {value!r}')
    if seconds < 0:
        raise ConfigError(f"{path}: must not be negative, got {value!r}")
    return seconds


def parse_size(value: object, path: str = "size") -> int:
    """Bytes from an integer or a string such as ``"25MB"`` (binary units: 1 MB = 1 MiB)."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f'{path}: expected a size like 1048576 or "25MB"; got {value!r}')
    if size < 0:
        raise ConfigError(f"{path}: must not be negative, got {value!r}")
    return size


def parse_hostport(spec: str, path: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; refuse anything else with the key path."""
    s = spec.strip()
    host, port_s = s, ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ConfigError(f"{path}: bad address {spec!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise ConfigError(f"{path}: bad address {spec!r}")
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    if not port_s:
        if default_port is None:
            raise ConfigError(f'{path}: expected "host:port", got {spec!r}')
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{path}: bad port in {spec!r}")
    if not host:
        raise ConfigError(f"{path}: missing host in {spec!r}")
    return host, int(port_s)


def _default_hostname() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    return name.lower()


@dataclass
class ServerConfig:
    """Process-wide settings."""

    hostname: str = field(default_factory=_default_hostname)
    shutdown_grace: float = field(default=30.0, metadata=_DURATION)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = 0  # processes sharing the work (docs/decisions/0004); 0 = one per CPU


@dataclass
class SmtpUser:
    """An SMTP AUTH identity; ``password_hash`` from ``postwarden hash-password``."""

    username: str
    password_hash: str


@dataclass
class SmtpConfig:
    """Submission listeners (mta.ingress)."""

    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"])
    # Clients that may relay without AUTH (as Postfix's mynetworks_style = host): the
    # host itself only. Trusted mail has no tenant: it may use any From and is signed
    # by whatever key that domain has.
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    max_message_size: int = field(default=25 * 1024 * 1024, metadata=_SIZE)
    max_recipients: int = 1000
    max_line_length: int = 1000
    max_sessions_per_ip: int = 100
    max_commands_per_session: int = 100_000
    idle_timeout: float = field(default=300.0, metadata=_DURATION)
    tls_cert: str = ""
    tls_key: str = ""
    bare_newlines: Literal["reject", "normalize"] = "reject"
    # More Received fields than this is a mail loop (554 5.4.6); Postfix's hopcount_limit.
    hop_limit: int = 50
    # RCPT TO:<x@[192.0.2.1]>: refused unless allowed (delivery still never connects to
    # private ranges that delivery.allowed_private_networks does not name).
    allow_address_literals: bool = False
    users: list[SmtpUser] = field(default_factory=list)
    # AUTH lockout per client address, across sessions and workers (mta.guard);
    # 0 failures turns it off.
    auth_lockout_failures: int = 10
    auth_lockout_window: float = field(default=600.0, metadata=_DURATION)
    auth_lockout_time: float = field(default=900.0, metadata=_DURATION)


@dataclass
class SpoolConfig:
    """The durable spool (queue.spool)."""

    path: str = "./var/spool"
    segment_size: int = field(default=64 * 1024 * 1024, metadata=_SIZE)
    fsync: bool = True
    # Events the control plane has copied go from the spool's log after this (0: never).
    event_retention: float = field(default=3 * 86400.0, metadata=_DURATION)
    # How often the spool reclaims empty segments and prunes copied events.
    upkeep_interval: float = field(default=10.0, metadata=_DURATION)


@dataclass
class DatabaseConfig:
    """Control-plane database (SQLAlchemy URL)."""

    url: str = "sqlite+aiosqlite:///./var/postwarden.db"
    auto_upgrade: bool = False  # apply migrations at start (labs, tests); else `db upgrade`
    # How long the control database keeps events, and messages with their recipients
    # (by creation time); 0 = for ever. Suppressions have their own expiry.
    event_retention: float = field(default=90 * 86400.0, metadata=_DURATION)
    message_retention: float = field(default=90 * 86400.0, metadata=_DURATION)
    prune_batch: int = 5000  # rows per DELETE statement while pruning
    prune_interval: float = field(default=3600.0, metadata=_DURATION)  # between prune runs


@dataclass
class DnsConfig:
    """Resolver used for MX lookups; empty ``nameservers`` means the system's."""

    nameservers: list[str] = field(default_factory=list)
    timeout: float = field(default=5.0, metadata=_DURATION)
    cache_size: int = 100_000


@dataclass
class DeliveryTimeouts:
    """RFC 5321 section 4.5.3.2 client timeouts."""

    connect: float = field(default=30.0, metadata=_DURATION)
    greeting: float = field(default=300.0, metadata=_DURATION)
    ehlo: float = field(default=300.0, metadata=_DURATION)
    mail: float = field(default=300.0, metadata=_DURATION)
    rcpt: float = field(default=300.0, metadata=_DURATION)
    data_init: float = field(default=120.0, metadata=_DURATION)
    data_block: float = field(default=180.0, metadata=_DURATION)
    data_term: float = field(default=600.0, metadata=_DURATION)
    idle: float = field(default=5.0, metadata=_DURATION)


@dataclass
class DeliveryConfig:
    """Outbound delivery (mta.delivery)."""

    mx_port: int = 25
    ehlo_hostname: str = ""
    source_address: str = ""
    max_connections: int = 400
    max_connections_per_domain: int = 20
    max_messages_per_connection: int = 100
    max_recipients_per_transaction: int = 100
    tls: Literal["opportunistic", "required", "disabled"] = "opportunistic"
    tls_verify: bool = False
    tls_policies: dict[str, Literal["opportunistic", "required", "disabled"]] = field(
        default_factory=dict
    )
    timeouts: DeliveryTimeouts = field(default_factory=DeliveryTimeouts)
    # CIDRs of non-global addresses (loopback, private, link-local...) delivery may
    # connect to; empty: only globally routable unicast addresses.
    allowed_private_networks: list[str] = field(default_factory=list)


@dataclass
class QueueConfig:
    """Scheduling, retries and expiry (queue.scheduler)."""

    max_age: float = field(default=5 * 86400.0, metadata=_DURATION)
    retry_initial: float = field(default=300.0, metadata=_DURATION)
    retry_factor: float = 2.0
    retry_max: float = field(default=4 * 3600.0, metadata=_DURATION)
    retry_jitter: float = 0.2
    scan_interval: float = field(default=1.0, metadata=_DURATION)
    max_inflight: int = 20_000


@dataclass
class ControlConfig:
    """Control plane: HTTP listener (API, ``/metrics``) and what the API decides."""

    listen: str = "127.0.0.1:8025"
    # Fernet key for DKIM private keys at rest; empty: read (or create) the key file.
    encryption_key: str = field(default="", repr=False)
    encryption_key_file: str = "./var/control.key"
    require_verified_domains: bool = True
    return_path_label: str = "pwb"  # bounce subdomain: <label>.<domain>
    tracking_label: str = "track"  # tracking host: <label>.<domain>
    bounce_mx_host: str = ""  # MX of the return path; "" = server.hostname
    tracking_host: str = ""  # CNAME target of the tracking host; "" = server.hostname
    spf_include: str = ""  # SPF mechanism to ask for; "" = ip4/ip6 of the source addresses
    rate_limit: float = 50.0  # API requests per second per key (per worker share)
    rate_burst: int = 100
    max_batch: int = 1000  # messages per POST /v1/messages/batch
    max_api_recipients: int = 1000  # to + cc + bcc of one API message
    idempotency_ttl: float = field(default=86400.0, metadata=_DURATION)
    cache_poll: float = field(default=1.0, metadata=_DURATION)  # change-feed poll interval
    # With `serve --role control`: the MTA submission listener API messages go to;
    # "" = the first of smtp.listen.
    submit_to: str = ""
    submit_ca_file: str = ""  # PEM CA/certificate the MTA's STARTTLS certificate must chain to
    # Bytes of API request bodies held at once, appliance-wide (each worker its share):
    # a request that would pass it waits briefly, then gets 503 with Retry-After.
    max_body_memory: int = field(default=256 * 1024 * 1024, metadata=_SIZE)


@dataclass
class MetricsConfig:
    """Who may read ``/metrics`` and what its labels may show."""

    # "host:port" of a listener for /metrics alone; "" = served on control.listen.
    listen: str = ""
    # When set, /metrics needs ``Authorization: Bearer <token>``: the token in a file
    # (one line), or only its SHA-256 in hex (the token stays with Prometheus).
    bearer_token_file: str = ""
    bearer_token_sha256: str = ""
    # Tenant and sending-domain names in label values (warming keys domain:<d>);
    # false: those series are summed under domain:- .
    tenant_labels: bool = False


@dataclass
class DkimKeyConfig:
    """One signing key from a file."""

    domain: str
    selector: str
    key_file: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


@dataclass
class DkimConfig:
    keys: list[DkimKeyConfig] = field(default_factory=list)


@dataclass
class SourceConfig:
    """A local address mail may leave from (issue 7): ``[[sources]]``."""

    name: str
    address: str
    ehlo: str = ""  # the EHLO name (and the PTR the address should have); "" = server.hostname
    state: Literal["active", "warming", "paused"] = "active"
    # With state "warming": the plan the source starts on, unless one was started
    # through the API or CLI (conservative | moderate | aggressive).
    warming_plan: Literal["conservative", "moderate", "aggressive"] = "moderate"


@dataclass
class PoolMember:
    source: str
    weight: int = 1


@dataclass
class PoolConfig:
    """Weighted sources: ``[[pools]]`` with ``[[pools.members]]``."""

    name: str
    members: list[PoolMember] = field(default_factory=list)
    overflow: Literal["wait", "spill"] = "wait"


@dataclass
class ShapingConfig:
    """Traffic shaping and warming (issue 7, docs/shaping.md): ``[shaping]``."""

    rules_file: str = ""  # the operator's rules (TOML) on top of the shipped ones; "" = shipped
    # The pool of mail that names none and whose tenant has no default; "" = "default"
    # (a pool of every source, or the implicit source of delivery.source_address).
    default_pool: str = ""
    state_file: str = ""  # warming progress and pauses; "" = <spool.path>/shaping-state.json
    socket: str = ""  # the broker's Unix socket (CLI, workers); "" = <spool.path>/shaping.sock
    timezone: str = "UTC"  # when a warming day rolls over (IANA name)
    health_window: float = field(default=86400.0, metadata=_DURATION)
    pause_min_volume: int = 500
    pause_bounce_rate: float = 0.05
    pause_complaint_rate: float = 0.001
    pause_delivery_rate: float = 0.90
    # How soon mail held by a paused source or domain is tried again (a resume takes
    # effect within this time).
    pause_recheck: float = field(default=60.0, metadata=_DURATION)


@dataclass
class InboundConfig:
    """The bounce and feedback-loop MX (mta.inbound, issue 8): ``[inbound]``.

    It accepts mail only for ``<control.return_path_label>.<sending domain>`` of every
    registered sending domain and for ``domains``; everything else is refused."""

    # [] = no inbound MX (bounces then come only from SMTP answers during delivery);
    # in production the MX of the return-path domains, e.g. ["0.0.0.0:25"].
    listen: list[str] = field(default_factory=list)
    # More domains accepted, e.g. the one of the address given to feedback loops.
    domains: list[str] = field(default_factory=list)
    max_message_size: int = field(default=10 * 1024 * 1024, metadata=_SIZE)
    max_recipients: int = 50
    max_sessions_per_ip: int = 20
    idle_timeout: float = field(default=60.0, metadata=_DURATION)
    path: str = ""  # where accepted reports wait to be parsed; "" = <spool.path>/inbound
    keep_unparsed: float = field(default=30 * 86400.0, metadata=_DURATION)


@dataclass
class BouncesConfig:
    """Return paths, the classifier and what bounces do (bounces/, issue 8): ``[bounces]``."""

    verp: bool = True  # a signed per-recipient return path on the sending domain
    # HMAC key of return-path tokens; "" = derived from the control encryption key.
    token_key: str = field(default="", repr=False)
    patterns_file: str = ""  # the operator's classifier patterns (TOML) before the shipped ones
    # This many soft bounces of one address within the window suppress it for the TTL.
    soft_bounce_limit: int = 3
    soft_bounce_window: float = field(default=7 * 86400.0, metadata=_DURATION)
    soft_bounce_ttl: float = field(default=14 * 86400.0, metadata=_DURATION)


DEFAULT_POOL = "default"
DEFAULT_SOURCE = "default"


@dataclass
class Config:
    """The whole appliance configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    pools: list[PoolConfig] = field(default_factory=list)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def ehlo_hostname(self) -> str:
        return self.delivery.ehlo_hostname or self.server.hostname

    def source_map(self) -> dict[str, SourceConfig]:
        """Every source by name; without ``[[sources]]``, the one implicit source
        ``default`` (``delivery.source_address``, or the kernel's choice when empty)."""
        if not self.sources:
            return {
                DEFAULT_SOURCE: SourceConfig(
                    DEFAULT_SOURCE, self.delivery.source_address, self.delivery.ehlo_hostname
                )
            }
        return {s.name: s for s in self.sources}

    def pool_map(self) -> dict[str, PoolConfig]:
        """Every configured pool by name, plus ``default`` (every source, weight 1)
        unless a pool of that name is configured."""
        pools = {p.name: p for p in self.pools}
        if DEFAULT_POOL not in pools:
            members = [PoolMember(name) for name in self.source_map()]
            pools[DEFAULT_POOL] = PoolConfig(DEFAULT_POOL, members)
        return pools

    @property
    def shaping_state_file(self) -> str:
        return self.shaping.state_file or os.path.join(self.spool.path, "shaping-state.json")

    @property
    def shaping_socket(self) -> str:
        return self.shaping.socket or os.path.join(self.spool.path, "shaping.sock")

    @property
    def inbound_path(self) -> str:
        return self.inbound.path or os.path.join(self.spool.path, "inbound")

    @property
    def default_pool(self) -> str:
        return self.shaping.default_pool or DEFAULT_POOL


# --------------------------------------------------------------------------- loading


def _convert(value: Any, tp: Any, path: str, meta: Mapping[str, Any]) -> Any:
    unit = meta.get("unit")
    if unit == "duration":
        return parse_duration(value, path)
    if unit == "size":
        return parse_size(value, path)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{path}: must be one of {', '.join(map(repr, allowed))}; got {value!r}"
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{path}[{i}]", {}) for i, v in enumerate(value)]
    if origin is dict:
        _key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
        return {str(k): _convert(v, val_tp, f"{path}.{k}", {}) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{path}: unsupported union type")  # not used by the schema
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{path}: unknown key (known here: {known})")
        f = fields[key]
        kwargs[key] = _convert(value, hints[key], path, f.metadata)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{path}: required key is missing")
    return cls(**kwargs)


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``POSTWARDEN_A__B=value`` variables into a nested mapping ``{a: {b: value}}``."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: malformed override variable name")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another override")
        node[parts[-1]] = _env_value(raw)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration.

    Order (later wins): embedded defaults, the TOML file, ``overrides`` (a nested
    mapping, used by the lab and tests), then ``POSTWARDEN_*__*`` environment variables.
    Raises :class:`ConfigError` naming the offending key.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: config file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        source = str(p)
    if overrides:
        data = _merge(data, overrides)
    env = env_overrides(os.environ if environ is None else environ)
    if env:
        data = _merge(data, env)
    cfg: Config = _build(Config, data, "")
    cfg.source = source
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field and format checks that types alone cannot express."""
    for i, spec in enumerate(cfg.smtp.listen):
        parse_hostport(spec, f"smtp.listen[{i}]")
    parse_hostport(cfg.control.listen, "control.listen")
    for i, spec in enumerate(cfg.inbound.listen):
        parse_hostport(spec, f"inbound.listen[{i}]")
    if cfg.control.submit_to:
        parse_hostport(cfg.control.submit_to, "control.submit_to")
    if cfg.metrics.listen:
        parse_hostport(cfg.metrics.listen, "metrics.listen")
    if cfg.metrics.bearer_token_sha256 and not re.fullmatch(
        r"[0-9a-f]{64}", cfg.metrics.bearer_token_sha256.lower()
    ):
        raise ConfigError("metrics.bearer_token_sha256: expected 64 hex digits (SHA-256)")
    if cfg.metrics.bearer_token_file and cfg.metrics.bearer_token_sha256:
        raise ConfigError(
            "metrics.bearer_token_file: give bearer_token_file or bearer_token_sha256, not both"
        )
    for i, net in enumerate(cfg.smtp.trusted_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"smtp.trusted_networks[{i}]: {exc}") from exc
    for i, ns in enumerate(cfg.dns.nameservers):
        parse_hostport(ns, f"dns.nameservers[{i}]", default_port=53)
    if bool(cfg.smtp.tls_cert) != bool(cfg.smtp.tls_key):
        raise ConfigError("smtp.tls_cert: tls_cert and tls_key must be given together")
    for i, user in enumerate(cfg.smtp.users):
        if not user.password_hash.startswith("scrypt$"):
            raise ConfigError(
                f"smtp.users[{i}].password_hash: expected a hash from "
                "`postwarden hash-password` (scrypt$...), never a plain password"
            )
    for i, net in enumerate(cfg.delivery.allowed_private_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"delivery.allowed_private_networks[{i}]: {exc}") from exc
    if cfg.delivery.source_address:
        try:
            ipaddress.ip_address(cfg.delivery.source_address)
        except ValueError as exc:
            raise ConfigError(f"delivery.source_address: {exc}") from exc
    positives = {
        "smtp.max_recipients": cfg.smtp.max_recipients,
        "smtp.max_line_length": cfg.smtp.max_line_length,
        "smtp.max_sessions_per_ip": cfg.smtp.max_sessions_per_ip,
        "smtp.max_commands_per_session": cfg.smtp.max_commands_per_session,
        "smtp.hop_limit": cfg.smtp.hop_limit,
        "smtp.max_message_size": cfg.smtp.max_message_size,
        "smtp.auth_lockout_window": cfg.smtp.auth_lockout_window,
        "smtp.auth_lockout_time": cfg.smtp.auth_lockout_time,
        "delivery.max_connections": cfg.delivery.max_connections,
        "delivery.max_connections_per_domain": cfg.delivery.max_connections_per_domain,
        "delivery.max_messages_per_connection": cfg.delivery.max_messages_per_connection,
        "delivery.max_recipients_per_transaction": cfg.delivery.max_recipients_per_transaction,
        "queue.max_inflight": cfg.queue.max_inflight,
        "spool.segment_size": cfg.spool.segment_size,
        "spool.upkeep_interval": cfg.spool.upkeep_interval,
        "dns.cache_size": cfg.dns.cache_size,
        "control.rate_limit": cfg.control.rate_limit,
        "control.rate_burst": cfg.control.rate_burst,
        "control.max_batch": cfg.control.max_batch,
        "control.max_api_recipients": cfg.control.max_api_recipients,
        "control.cache_poll": cfg.control.cache_poll,
        "control.max_body_memory": cfg.control.max_body_memory,
        "database.prune_batch": cfg.database.prune_batch,
        "database.prune_interval": cfg.database.prune_interval,
        "inbound.max_message_size": cfg.inbound.max_message_size,
        "inbound.max_recipients": cfg.inbound.max_recipients,
        "inbound.max_sessions_per_ip": cfg.inbound.max_sessions_per_ip,
        "bounces.soft_bounce_limit": cfg.bounces.soft_bounce_limit,
        "bounces.soft_bounce_window": cfg.bounces.soft_bounce_window,
        "bounces.soft_bounce_ttl": cfg.bounces.soft_bounce_ttl,
    }
    for path, value in positives.items():
        if value <= 0:
            raise ConfigError(f"{path}: must be greater than 0, got {value}")
    if cfg.control.encryption_key:
        from cryptography.fernet import Fernet

        try:
            Fernet(cfg.control.encryption_key)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                "control.encryption_key: expected a Fernet key (32 url-safe base64 bytes)"
            ) from exc
    if cfg.bounces.token_key and len(cfg.bounces.token_key) < 16:
        raise ConfigError("bounces.token_key: at least 16 characters (a secret)")
    for name in ("return_path_label", "tracking_label"):
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", getattr(cfg.control, name)):
            raise ConfigError(f"control.{name}: expected one DNS label (a-z, 0-9, -)")
    if not 0 <= cfg.server.workers <= 256:
        raise ConfigError(
            f"server.workers: must be 0 (one per CPU) to 256, got {cfg.server.workers}"
        )
    if not 0 < cfg.delivery.mx_port <= 65535:
        raise ConfigError(f"delivery.mx_port: not a TCP port: {cfg.delivery.mx_port}")
    if cfg.smtp.auth_lockout_failures < 0:
        raise ConfigError(
            "smtp.auth_lockout_failures: must be 0 (off) or more, got"
            f" {cfg.smtp.auth_lockout_failures}"
        )
    if cfg.smtp.max_line_length < 80:
        raise ConfigError("smtp.max_line_length: must be at least 80")
    if cfg.queue.retry_factor < 1.0:
        raise ConfigError("queue.retry_factor: must be at least 1.0")
    if not 0.0 <= cfg.queue.retry_jitter < 1.0:
        raise ConfigError("queue.retry_jitter: must be in [0, 1)")
    if cfg.queue.retry_initial <= 0:
        raise ConfigError("queue.retry_initial: must be greater than 0")
    for i, key in enumerate(cfg.dkim.keys):
        if not key.domain or not key.selector:
            raise ConfigError(f"dkim.keys[{i}]: domain and selector are required")
    names: set[str] = set()
    for i, src in enumerate(cfg.sources):
        if not src.name or src.name in names:
            raise ConfigError(f"sources[{i}].name: must be given and unique, got {src.name!r}")
        names.add(src.name)
        try:
            ipaddress.ip_address(src.address)
        except ValueError as exc:
            raise ConfigError(f"sources[{i}].address: {exc}") from exc
    pool_names: set[str] = set()
    for i, pool in enumerate(cfg.pools):
        if not pool.name or pool.name in pool_names:
            raise ConfigError(f"pools[{i}].name: must be given and unique, got {pool.name!r}")
        pool_names.add(pool.name)
        if not pool.members:
            raise ConfigError(f"pools[{i}].members: a pool needs at least one source")
        for j, m in enumerate(pool.members):
            if m.source not in names:
                raise ConfigError(f"pools[{i}].members[{j}].source: no source named {m.source!r}")
            if m.weight <= 0:
                raise ConfigError(f"pools[{i}].members[{j}].weight: must be greater than 0")
    sh = cfg.shaping
    if sh.default_pool and sh.default_pool not in cfg.pool_map():
        raise ConfigError(f"shaping.default_pool: no pool named {sh.default_pool!r}")
    try:
        zoneinfo.ZoneInfo(sh.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"shaping.timezone: unknown time zone {sh.timezone!r}") from exc
    for rate_key in ("pause_bounce_rate", "pause_complaint_rate", "pause_delivery_rate"):
        if not 0.0 < getattr(sh, rate_key) <= 1.0:
            raise ConfigError(f"shaping.{rate_key}: must be in (0, 1]")
