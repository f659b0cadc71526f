"""One typed configuration object, loaded from TOML with ``POSTWARDEN_*`` overrides.

The file is optional: every key has an embedded default so ``postwarden serve`` with
no file runs. Unknown keys and bad values are refused at load time with the key's
dotted path (``smtp.listen[1]: ...``), never silently ignored.

Environment overrides use a double underscore between path parts:
``POSTWARDEN_SMTP__LISTEN='["0.0.0.0:587"]'``, ``POSTWARDEN_DELIVERY__MX_PORT=2526``.
The value is read as a TOML value when it parses as one, else as a plain string.

The sections are pydantic dataclasses: the types below check every value (a
``Duration`` or ``Size`` also takes human units), and :func:`validate` adds the checks
between keys. Values are frozen (a reload builds a new one) but for ``[database]``.
The files the config names are read by what uses them, and checked at start and
reload by ``supervisor.check_files`` (shaping rules, bounce patterns) and
``appliance.config_keys`` (DKIM keys). This module imports nothing else from
postwarden: everything may import it.
"""

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import typing
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Gt
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Strict, TypeAdapter
from pydantic import ValidationError as _ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

ENV_PREFIX = "POSTWARDEN_"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names its path."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}  # fmt: skip


def _at(path: str, parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)``, its ValueError turned into a ConfigError naming ``path``."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f'expected a duration like 30, "30s", "5m", "5d"; got {value!r}')
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _bytes(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f'expected a size like 1048576 or "25MB"; got {value!r}')
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return size


def _host_port(spec: str, default_port: int | None = None) -> tuple[str, int]:
    s = spec.strip()
    host, port_s = s, ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"bad address {spec!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise ValueError(f"bad address {spec!r}")
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    if not port_s:
        if default_port is None:
            raise ValueError(f'expected "host:port", got {spec!r}')
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port in {spec!r}")
    if not host:
        raise ValueError(f"missing host in {spec!r}")
    return host, int(port_s)


def parse_duration(value: object, path: str = "duration") -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"30s"``, ``"5m"``, ``"5d"``."""
    return _at(path, _seconds, value)


def parse_size(value: object, path: str = "size") -> int:
    """Bytes from an integer or a string such as ``"25MB"`` (binary units: 1 MB = 1 MiB)."""
    return _at(path, _bytes, value)


def parse_hostport(spec: str, path: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; refuse anything else with the key path."""
    return _at(path, _host_port, spec, default_port)


def _checked(check: Callable[[str], object], optional: bool = False) -> AfterValidator:
    """A string ``check`` must accept (its ValueError says why); "" passes if optional."""

    def run(value: str) -> str:
        if value or not optional:
            check(value)
        return value

    return AfterValidator(run)


# The types of config values: TOML's own, strictly (no "1" for 1, no true for 1), and
# human units; ``Pos...`` must be greater than 0.
Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict()]
PosInt = Annotated[int, Strict(), Gt(0)]
PosFloat = Annotated[float, Strict(), Gt(0)]
Duration = Annotated[float, BeforeValidator(_seconds)]
PosDuration = Annotated[float, Gt(0), BeforeValidator(_seconds)]
PosSize = Annotated[int, Gt(0), BeforeValidator(_bytes)]
HostPort = Annotated[str, Strict(), _checked(_host_port)]
OptHostPort = Annotated[str, Strict(), _checked(_host_port, optional=True)]
Nameserver = Annotated[str, Strict(), _checked(lambda s: _host_port(s, 53))]
Network = Annotated[str, Strict(), _checked(lambda s: ipaddress.ip_network(s, strict=False))]
OptAddress = Annotated[str, Strict(), _checked(ipaddress.ip_address, optional=True)]
TlsMode = Literal["opportunistic", "required", "disabled"]

_TOML = ConfigDict(extra="forbid")


def _default_hostname() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    return name.lower()


@dataclass(config=_TOML, frozen=True)
class ServerConfig:
    """Process-wide settings."""

    hostname: Str = field(default_factory=_default_hostname)
    shutdown_grace: Duration = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: Int = 0  # processes sharing the work (docs/decisions/0004); 0 = one per CPU
    fork_workers: Bool = True  # started by fork from a preloaded process (forkserver.py)


@dataclass(config=_TOML, frozen=True)
class SmtpUser:
    """An SMTP AUTH identity; ``password_hash`` from ``postwarden hash-password``."""

    username: Str
    password_hash: Str


@dataclass(config=_TOML, frozen=True)
class SmtpConfig:
    """Submission listeners (mta.ingress)."""

    listen: list[HostPort] = field(default_factory=lambda: ["127.0.0.1:2525"])
    # Clients that may relay without AUTH (as Postfix's mynetworks_style = host): the
    # host itself only. Trusted mail has no tenant: it may use any From and is signed
    # by whatever key that domain has.
    trusted_networks: list[Network] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    max_message_size: PosSize = 25 * 1024 * 1024
    max_recipients: PosInt = 1000
    max_line_length: PosInt = 1000
    max_sessions_per_ip: PosInt = 100
    max_commands_per_session: PosInt = 100_000
    idle_timeout: Duration = 300.0
    tls_cert: Str = ""
    tls_key: Str = ""
    bare_newlines: Literal["reject", "normalize"] = "reject"
    # More Received fields than this is a mail loop (554 5.4.6); Postfix's hopcount_limit.
    hop_limit: PosInt = 50
    # RCPT TO:<x@[192.0.2.1]>: refused unless allowed (delivery still never connects to
    # private ranges that delivery.allowed_private_networks does not name).
    allow_address_literals: Bool = False
    users: list[SmtpUser] = field(default_factory=list)
    # AUTH lockout per client address, across sessions and workers (mta.guard);
    # 0 failures turns it off.
    auth_lockout_failures: Int = 10
    auth_lockout_window: PosDuration = 600.0
    auth_lockout_time: PosDuration = 900.0


@dataclass(config=_TOML, frozen=True)
class SpoolConfig:
    """The durable spool (queue.spool)."""

    path: Str = "./var/spool"
    segment_size: PosSize = 64 * 1024 * 1024
    fsync: Bool = True
    # Events the control plane has copied go from the spool's log after this (0: never).
    event_retention: Duration = 3 * 86400.0
    # How often the spool reclaims empty segments and prunes copied events.
    upkeep_interval: PosDuration = 10.0


@dataclass(config=_TOML)
class DatabaseConfig:
    """Control-plane database (SQLAlchemy URL). Not frozen: the pruner's tests tune it."""

    url: Str = "sqlite+aiosqlite:///./var/postwarden.db"
    auto_upgrade: Bool = False  # apply migrations at start (labs, tests); else `db upgrade`
    # How long the control database keeps events, and messages with their recipients
    # (by creation time); 0 = for ever. Suppressions have their own expiry.
    event_retention: Duration = 90 * 86400.0
    message_retention: Duration = 90 * 86400.0
    # Tracking hits (their IP addresses and user agents: personal data), by hit time.
    tracking_retention: Duration = 90 * 86400.0
    # The analytics' hourly counts (stat_hours), by their hour: they outlive the events.
    analytics_retention: Duration = 400 * 86400.0
    prune_batch: PosInt = 5000  # rows per DELETE statement while pruning
    prune_interval: PosDuration = 3600.0  # between prune runs


@dataclass(config=_TOML, frozen=True)
class DnsConfig:
    """Resolver used for MX lookups; empty ``nameservers`` means the system's."""

    nameservers: list[Nameserver] = field(default_factory=list)
    timeout: Duration = 5.0
    cache_size: PosInt = 100_000


@dataclass(config=_TOML, frozen=True)
class DeliveryTimeouts:
    """RFC 5321 section 4.5.3.2 client timeouts."""

    connect: Duration = 30.0
    greeting: Duration = 300.0
    ehlo: Duration = 300.0
    mail: Duration = 300.0
    rcpt: Duration = 300.0
    data_init: Duration = 120.0
    data_block: Duration = 180.0
    data_term: Duration = 600.0
    idle: Duration = 5.0


@dataclass(config=_TOML, frozen=True)
class DeliveryConfig:
    """Outbound delivery (mta.delivery)."""

    mx_port: Int = 25
    ehlo_hostname: Str = ""
    source_address: OptAddress = ""
    max_connections: PosInt = 400
    max_connections_per_domain: PosInt = 20
    max_messages_per_connection: PosInt = 100
    max_recipients_per_transaction: PosInt = 100
    tls: TlsMode = "opportunistic"
    tls_verify: Bool = False
    tls_policies: dict[str, TlsMode] = field(default_factory=dict)
    timeouts: DeliveryTimeouts = field(default_factory=DeliveryTimeouts)
    # CIDRs of non-global addresses (loopback, private, link-local...) delivery may
    # connect to; empty: only globally routable unicast addresses.
    allowed_private_networks: list[Network] = field(default_factory=list)


@dataclass(config=_TOML, frozen=True)
class QueueConfig:
    """Scheduling, retries and expiry (queue.scheduler)."""

    max_age: Duration = 5 * 86400.0
    retry_initial: Duration = 300.0
    retry_factor: Float = 2.0
    retry_max: Duration = 4 * 3600.0
    retry_jitter: Float = 0.2
    scan_interval: Duration = 1.0
    max_inflight: PosInt = 20_000


@dataclass(config=_TOML, frozen=True)
class ControlConfig:
    """Control plane: HTTP listener (API, ``/metrics``) and what the API decides."""

    listen: HostPort = "127.0.0.1:8025"
    # Fernet key for DKIM private keys at rest; empty: read (or create) the key file.
    encryption_key: Str = field(default="", repr=False)
    encryption_key_file: Str = "./var/control.key"
    require_verified_domains: Bool = True
    return_path_label: Str = "pwb"  # bounce subdomain: <label>.<domain>
    tracking_label: Str = "track"  # tracking host: <label>.<domain>
    bounce_mx_host: Str = ""  # MX of the return path; "" = server.hostname
    tracking_host: Str = ""  # CNAME target of the tracking host; "" = server.hostname
    # Base URL of the links recipients follow (List-Unsubscribe now, tracking later):
    # "https://mail.example.com" or with a path prefix; "" = http://<control.listen>.
    public_url: Str = ""
    spf_include: Str = ""  # SPF mechanism to ask for; "" = ip4/ip6 of the source addresses
    rate_limit: PosFloat = 50.0  # API requests per second per key (per worker share)
    rate_burst: PosInt = 100
    max_batch: PosInt = 1000  # messages per POST /v1/messages/batch
    max_api_recipients: PosInt = 1000  # to + cc + bcc of one API message
    idempotency_ttl: Duration = 86400.0
    cache_poll: PosDuration = 1.0  # change-feed poll interval
    # With `serve --role control`: the MTA submission listener API messages go to;
    # "" = the first of smtp.listen.
    submit_to: OptHostPort = ""
    submit_ca_file: Str = ""  # PEM CA/certificate the MTA's STARTTLS certificate must chain to
    # Bytes of API request bodies held at once, appliance-wide (each worker its share):
    # a request that would pass it waits briefly, then gets 503 with Retry-After.
    max_body_memory: PosSize = 256 * 1024 * 1024
    # Rows of a contact import committed per transaction (with the import's cursor).
    import_batch: PosInt = 1000
    # Longest an audience's count may take on PostgreSQL (a preview, a campaign's
    # validation): a hostile or careless rule is stopped, not left to run.
    count_timeout: PosDuration = 10.0


@dataclass(config=_TOML, frozen=True)
class MetricsConfig:
    """Who may read ``/metrics`` and what its labels may show."""

    # "host:port" of a listener for /metrics alone; "" = served on control.listen.
    listen: OptHostPort = ""
    # When set, /metrics needs ``Authorization: Bearer <token>``: the token in a file
    # (one line), or only its SHA-256 in hex (the token stays with Prometheus).
    bearer_token_file: Str = ""
    bearer_token_sha256: Str = ""
    # Tenant and sending-domain names in label values (warming keys domain:<d>);
    # false: those series are summed under domain:- .
    tenant_labels: Bool = False


@dataclass(config=_TOML, frozen=True)
class DkimKeyConfig:
    """One signing key from a file."""

    domain: Str
    selector: Str
    key_file: Str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


@dataclass(config=_TOML, frozen=True)
class DkimConfig:
    keys: list[DkimKeyConfig] = field(default_factory=list)


@dataclass(config=_TOML, frozen=True)
class SourceConfig:
    """A local address mail may leave from (issue 7): ``[[sources]]``."""

    name: Str
    address: Str
    ehlo: Str = ""  # the EHLO name (and the PTR the address should have); "" = server.hostname
    state: Literal["active", "warming", "paused"] = "active"
    # With state "warming": the plan the source starts on, unless one was started
    # through the API or CLI (conservative | moderate | aggressive).
    warming_plan: Literal["conservative", "moderate", "aggressive"] = "moderate"


@dataclass(config=_TOML, frozen=True)
class PoolMember:
    source: Str
    weight: Int = 1


@dataclass(config=_TOML, frozen=True)
class PoolConfig:
    """Weighted sources: ``[[pools]]`` with ``[[pools.members]]``."""

    name: Str
    members: list[PoolMember] = field(default_factory=list)
    overflow: Literal["wait", "spill"] = "wait"


@dataclass(config=_TOML, frozen=True)
class ShapingConfig:
    """Traffic shaping and warming (issue 7, docs/shaping.md): ``[shaping]``."""

    rules_file: Str = ""  # the operator's rules (TOML) on top of the shipped ones; "" = shipped
    # The pool of mail that names none and whose tenant has no default; "" = "default"
    # (a pool of every source, or the implicit source of delivery.source_address).
    default_pool: Str = ""
    state_file: Str = ""  # warming progress and pauses; "" = <spool.path>/shaping-state.json
    socket: Str = ""  # the broker's Unix socket (CLI, workers); "" = <spool.path>/shaping.sock
    timezone: Str = "UTC"  # when a warming day rolls over (IANA name)
    health_window: Duration = 86400.0
    pause_min_volume: Int = 500
    pause_bounce_rate: Float = 0.05
    pause_complaint_rate: Float = 0.001
    pause_delivery_rate: Float = 0.90
    # How soon mail held by a paused source or domain is tried again (a resume takes
    # effect within this time).
    pause_recheck: Duration = 60.0


@dataclass(config=_TOML, frozen=True)
class InboundConfig:
    """The bounce and feedback-loop MX (mta.inbound, issue 8): ``[inbound]``.

    It accepts mail only for ``<control.return_path_label>.<sending domain>`` of every
    registered sending domain and for ``domains``; everything else is refused."""

    # [] = no inbound MX (bounces then come only from SMTP answers during delivery);
    # in production the MX of the return-path domains, e.g. ["0.0.0.0:25"].
    listen: list[HostPort] = field(default_factory=list)
    # More domains accepted, e.g. the one of the address given to feedback loops.
    domains: list[Str] = field(default_factory=list)
    max_message_size: PosSize = 10 * 1024 * 1024
    max_recipients: PosInt = 50
    max_sessions_per_ip: PosInt = 20
    idle_timeout: Duration = 60.0
    path: Str = ""  # where accepted reports wait to be parsed; "" = <spool.path>/inbound
    keep_unparsed: Duration = 30 * 86400.0


@dataclass(config=_TOML, frozen=True)
class BouncesConfig:
    """Return paths, the classifier and what bounces do (bounces/, issue 8): ``[bounces]``."""

    verp: Bool = True  # a signed per-recipient return path on the sending domain
    # HMAC key of return-path tokens; "" = derived from the control encryption key.
    token_key: Str = field(default="", repr=False)
    patterns_file: Str = ""  # the operator's classifier patterns (TOML) before the shipped ones
    # This many soft bounces of one address within the window suppress it for the TTL.
    soft_bounce_limit: PosInt = 3
    soft_bounce_window: PosDuration = 7 * 86400.0
    soft_bounce_ttl: PosDuration = 14 * 86400.0


@dataclass(config=_TOML, frozen=True)
class CampaignsConfig:
    """The campaign runner (control.campaign_runner, issue 21): ``[campaigns]``."""

    # Messages of one campaign in the spool and not yet delivered or failed, at most:
    # the feeder hands over more only as delivery (at the pace of warming and shaping)
    # makes room, so the spool holds what can go soon, not the whole audience.
    feed_window: PosInt = 2000
    feed_batch: PosInt = 200  # records rendered and handed to the spool per step
    launch_batch: PosInt = 5000  # send records written per transaction at launch
    poll: PosDuration = 1.0  # seconds between looks for work when nothing is due


@dataclass(config=_TOML, frozen=True)
class TrackingConfig:
    """Open and click tracking (engagement, issue 22; docs/tracking.md): ``[tracking]``."""

    # Hits are judged this long after they arrive, when what follows them is known
    # (the click after a pixel, the other links of a message).
    settle: PosDuration = 60.0
    verdicts_file: Str = ""  # the operator's verdict rules (TOML), before the shipped ones
    # The hit writer: one transaction per batch of at most this many hits, the
    # requests waiting for it (a hit answered is a hit stored).
    hit_batch: PosInt = 500


DEFAULT_POOL = "default"
DEFAULT_SOURCE = "default"


@dataclass(config=_TOML, frozen=True)
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
    campaigns: CampaignsConfig = field(default_factory=CampaignsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: Str = "<defaults>"  # the file it was read from: not a key (load_config)

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

_CONFIG = TypeAdapter(Config)
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the table at ``loc`` (the type at the path, from Config down)."""
    tp: Any = Config
    for part in loc:
        if isinstance(part, str) and dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp)[part]
        else:  # an item of a list (or a value of a dict)
            tp = typing.get_args(tp)[-1]
    return sorted(f.name for f in dataclasses.fields(tp) if tp is not Config or f.name != "source")


def _error(e: ErrorDetails) -> ConfigError:
    """One pydantic error as the loader says it: ``dotted.path[i]: what is wrong``."""
    loc, kind, value = e["loc"], e["type"], e["input"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    ctx = e.get("ctx", {})
    if kind == "unexpected_keyword_argument":
        message = f"unknown key (known here: {', '.join(_keys_at(loc[:-1]))})"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = str(ctx["error"])
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected'].replace(' or ', ', ')}; got {value!r}"
    elif kind == "greater_than":
        message = f"must be greater than 0, got {type(ctx['gt'])(value)}"  # as int or float
    elif kind in ("dataclass_type", "dict_type", "list_type"):
        what = "a list" if kind == "list_type" else "a table"
        message = f"expected {what}, got {type(value).__name__}"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {value!r}"
    else:
        message = e["msg"]
    return ConfigError(f"{path}: {message}")


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
    Raises :class:`ConfigError` naming the offending key. The files the configuration
    names are not read here (``postwarden check-config`` checks them).
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
    if "source" in data:
        raise ConfigError(f"source: unknown key (known here: {', '.join(_keys_at(()))})")
    try:
        cfg = _CONFIG.validate_python({**data, "source": source})
    except _ValidationError as exc:
        raise _error(exc.errors()[0]) from None
    validate(cfg)
    return cfg


def _public_url(url: str) -> None:
    """An absolute http(s) URL with a host, and nothing a base URL cannot have."""
    from urllib.parse import urlsplit

    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"expected an ASCII URL without spaces, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a bad port)
    except ValueError as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f'expected "https://host[:port][/path]", got {url!r}')
    if parts.username is not None or parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"a base URL has no user, query or fragment: {url!r}")
    if any(c in url for c in '<>,"'):
        raise ValueError(f"<, >, comma and quotes cannot be in a link header: {url!r}")


def validate(cfg: Config) -> None:
    """Checks between keys, and of formats the types above do not say."""
    if cfg.metrics.bearer_token_sha256 and not re.fullmatch(
        r"[0-9a-f]{64}", cfg.metrics.bearer_token_sha256.lower()
    ):
        raise ConfigError("metrics.bearer_token_sha256: expected 64 hex digits (SHA-256)")
    if cfg.metrics.bearer_token_file and cfg.metrics.bearer_token_sha256:
        raise ConfigError(
            "metrics.bearer_token_file: give bearer_token_file or bearer_token_sha256, not both"
        )
    if bool(cfg.smtp.tls_cert) != bool(cfg.smtp.tls_key):
        raise ConfigError("smtp.tls_cert: tls_cert and tls_key must be given together")
    for i, user in enumerate(cfg.smtp.users):
        if not user.password_hash.startswith("scrypt$"):
            raise ConfigError(
                f"smtp.users[{i}].password_hash: expected a hash from "
                "`postwarden hash-password` (scrypt$...), never a plain password"
            )
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
    if cfg.control.public_url:
        _at("control.public_url", _public_url, cfg.control.public_url)
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
        _at(f"sources[{i}].address", ipaddress.ip_address, src.address)
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
