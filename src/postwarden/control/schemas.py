"""Request and response bodies of the API (pydantic), and their validation rules."""

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
)

from postwarden.mail.addresses import AddressError, normalize_address

Scope = Literal["send", "read", "manage", "approve"]
Reason = Literal["unsubscribe", "hard_bounce", "soft_bounce", "complaint", "manual"]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)


def _domain_name(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    if not _HOSTNAME.match(v):
        raise ValueError("not a domain name")
    return v


def _address(value: str) -> str:
    try:
        return normalize_address(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


DomainName = Annotated[
    str, StringConstraints(min_length=3, max_length=253), AfterValidator(_domain_name)
]
Address = Annotated[str, StringConstraints(min_length=3, max_length=320), AfterValidator(_address)]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
POOL_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
PoolName = Annotated[str, StringConstraints(pattern=POOL_NAME)]
Cursor = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
MAX_ID = 2**63 - 1  # ids are 64-bit in every database

# What may not be inside one line of a header (subject, display names, header values,
# file names): every control character but TAB (C0, DEL and C1, U+0085 NEL among
# them), the Unicode line and paragraph separators (str.splitlines and the email
# package break lines there) and lone surrogates (no UTF-8 for them).
_NOT_ONE_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(value: str) -> str:
    bad = _NOT_ONE_LINE.search(value)
    if bad is not None:
        raise ValueError(
            f"character U+{ord(bad.group()):04X} at {bad.start()}: control characters,"
            " line breaks and line or paragraph separators are not allowed"
        )
    return value


def utc(value: dt.datetime) -> dt.datetime:
    """An aware datetime in UTC; ValueError (its message fit for the field) when it has
    no zone or falls outside years 1-9999 once in UTC (0001-01-01T00:00+14:00 does)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("give a time zone (e.g. 2027-01-01T00:00:00Z)")
    try:
        return value.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise ValueError("out of range once in UTC (years 1 to 9999)") from None


def parse_timestamp(text: str) -> dt.datetime:
    """ISO 8601 text with a zone → UTC datetime (the CSV import's rule, as the API's)."""
    return utc(dt.datetime.fromisoformat(text))


#: Every time the API takes: ISO 8601 with a zone, representable in UTC.
Timestamp = Annotated[dt.datetime, AfterValidator(utc)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(Strict):
    cursor: Cursor | None = Field(None, description="next_cursor of the previous page")
    limit: int = Field(100, ge=1, le=1000, description="items per page")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    from postwarden.control.errors import invalid

    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = int(raw.decode("ascii"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid("cursor", "not a cursor this API gave") from None
    if not 0 <= value <= MAX_ID:
        raise invalid("cursor", "not a cursor this API gave")
    return value


# ---------------------------------------------------------------- tenants and keys


TrackingMode = Literal["off", "anonymous", "per_recipient"]


class TenantSettings(Strict):
    bounce_notifications: bool = False
    postal_address: Annotated[
        str,
        StringConstraints(max_length=500),
        Field(
            description="the physical postal address marketing mail carries (CAN-SPAM):"
            " {{ postal_address }} in templates"
        ),
    ] = ""
    single_key_approval: Annotated[
        bool,
        Field(
            description="a campaign may be approved by the key that last changed it (for"
            " installs run by one person); otherwise approval takes another key"
        ),
    ] = False
    frequency_cap: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="bulk messages (campaigns) a contact may be sent in 24 hours; a"
            " record over the cap is suppressed with reason frequency_cap. 0: no cap",
        ),
    ] = 0
    tracking: Annotated[
        TrackingMode,
        Field(
            description="open and click tracking of campaigns (a campaign may say"
            " otherwise): off; anonymous (counts per campaign and link, no contact in"
            " the links); per_recipient (who opened and clicked)"
        ),
    ] = "anonymous"
    truncate_ip: Annotated[
        bool,
        Field(
            description="keep tracking hits' IP addresses truncated (IPv4 to /24, IPv6 to"
            " /48) instead of whole"
        ),
    ] = False


_DEFAULT_POOL = "the pool of its mail that names none; null: the appliance's default pool"
_ALLOWED_POOLS = "other pools its mail may name (X-Postwarden-Pool, the messages API's pool)"


class TenantCreate(Strict):
    name: Name
    settings: TenantSettings = Field(default_factory=TenantSettings)
    default_pool: PoolName | None = Field(None, description=_DEFAULT_POOL)
    allowed_pools: list[PoolName] = Field(
        default_factory=list, max_length=100, description=_ALLOWED_POOLS
    )


class TenantUpdate(Strict):
    disabled: bool | None = None
    settings: TenantSettings | None = None
    default_pool: PoolName | None = Field(
        None, description=_DEFAULT_POOL + " (given as null: no default pool any more)"
    )
    allowed_pools: list[PoolName] | None = Field(
        None, max_length=100, description=_ALLOWED_POOLS + " (replaces the list)"
    )


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: dt.datetime
    disabled: bool
    settings: TenantSettings
    default_pool: str | None
    allowed_pools: list[str]


class TenantList(BaseModel):
    data: list[TenantOut]
    next_cursor: str | None


# ---------------------------------------------------------------- pools (operator)


class PoolMemberIn(Strict):
    source: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="the name of a source of the configuration ([[sources]])"
    )
    weight: int = Field(1, gt=0, le=1_000_000, description="its share of the pool's mail")


class PoolCreate(Strict):
    name: PoolName
    members: list[PoolMemberIn] = Field(min_length=1, max_length=1000)
    overflow: Literal["wait", "spill"] = Field(
        "wait",
        description="when a source reaches a cap: wait for it, or spill to the pool's others",
    )


class PoolUpdate(Strict):
    members: list[PoolMemberIn] | None = Field(None, min_length=1, max_length=1000)
    overflow: Literal["wait", "spill"] | None = None


class PoolMemberOut(BaseModel):
    source: str
    weight: int


class PoolOut(BaseModel):
    name: str
    origin: Literal["config", "api"] = Field(
        description="config: from the configuration file, read-only here; api: made here"
    )
    members: list[PoolMemberOut]
    overflow: Literal["wait", "spill"]
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


class PoolList(BaseModel):
    data: list[PoolOut]
    next_cursor: str | None = Field(None, description="always null: every pool is in one page")


class KeyCreate(Strict):
    name: Annotated[str, StringConstraints(max_length=200)] = ""
    scopes: list[Scope] = Field(min_length=1, max_length=4)


class KeyOut(BaseModel):
    id: int
    prefix: str
    name: str
    scopes: list[str]
    tenant_id: int | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the secret key; shown this once, stored only hashed")


class KeyList(BaseModel):
    data: list[KeyOut]
    next_cursor: str | None


class OperatorKeyCreate(Strict):
    name: Annotated[str, StringConstraints(max_length=200)] = "operator"


class OperatorKeyOut(KeyOut):
    current: bool = Field(description="whether this is the key the request was made with")


class OperatorKeyCreated(OperatorKeyOut):
    key: str = Field(description="the secret key; shown this once, stored only hashed")


class OperatorKeyList(BaseModel):
    data: list[OperatorKeyOut]
    next_cursor: str | None


# ---------------------------------------------------------------- domains


class DomainCreate(Strict):
    name: DomainName


class RecordOut(BaseModel):
    purpose: str
    type: str
    name: str
    value: str
    required: bool
    status: str
    found: list[str]
    detail: str


class DkimKeyOut(BaseModel):
    selector: str
    algorithm: str
    generation: int
    state: Literal["signing", "pending", "retired"]
    verified_at: dt.datetime | None


class DomainOut(BaseModel):
    id: int
    name: str
    created_at: dt.datetime
    verified: bool
    verified_at: dt.datetime | None
    checked_at: dt.datetime | None
    return_path: str
    dkim: list[DkimKeyOut]
    records: list[RecordOut]


class DomainList(BaseModel):
    data: list[DomainOut]
    next_cursor: str | None


# ---------------------------------------------------------------- suppressions


class SuppressionCreate(Strict):
    address: Address
    reason: Reason = "manual"
    source: Annotated[str, StringConstraints(max_length=100)] = "api"
    note: Annotated[str, StringConstraints(max_length=2000)] = ""
    expires_at: Timestamp | None = None


class SuppressionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    address: str
    reason: str
    source: str
    note: str
    created_at: dt.datetime
    expires_at: dt.datetime | None


class SuppressionList(BaseModel):
    data: list[SuppressionOut]
    next_cursor: str | None


class SuppressionQuery(Page):
    reason: Reason | None = None
    q: Annotated[str, StringConstraints(max_length=320)] | None = Field(
        None, description="addresses containing this text"
    )


class ImportResult(BaseModel):
    created: int
    updated: int
    errors: list[dict[str, Any]]


class Deleted(BaseModel):
    deleted: bool


# ---------------------------------------------------------------- message lists

#: Every state a message's recipient can be in (the event copier's states).
RecipientStateName = Literal[
    "queued", "deferred", "delivered", "bounced", "expired", "dropped", "deleted"
]
MessageCursor = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,120}$")]
_TAG = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$"  # as a message's tags (messages.Tag)


class MessageQuery(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    status: RecipientStateName | None = Field(
        None, description="messages with at least one recipient in this state"
    )
    since: Timestamp | None = Field(None, description="messages accepted at or after (ISO 8601)")
    until: Timestamp | None = Field(None, description="messages accepted before (ISO 8601)")
    recipient: Annotated[str, StringConstraints(min_length=1, max_length=320)] | None = Field(
        None, description="messages with this recipient (the address as it was sent to)"
    )
    tag: Annotated[str, StringConstraints(pattern=_TAG)] | None = Field(
        None, description="messages with this tag"
    )
    from_: Annotated[str, StringConstraints(min_length=1, max_length=320)] | None = Field(
        None, alias="from", description="messages with this envelope sender (MAIL FROM)"
    )
    domain: DomainName | None = Field(
        None, description="messages whose envelope sender is at this domain"
    )
    source: Literal["api", "smtp"] | None = Field(None, description="how the message came in")
    cursor: MessageCursor | None = Field(None, description="next_cursor of the previous page")
    limit: int = Field(100, ge=1, le=1000, description="items per page")


class MessageSummary(BaseModel):
    id: str
    tenant_id: int
    created_at: dt.datetime
    mail_from: str
    subject: str
    source: str
    tags: list[str]
    metadata: dict[str, Any]
    recipients: int = Field(description="how many recipients the message has")
    states: dict[str, int] = Field(
        description="how many of its recipients are in each state (states with none left out)"
    )


class MessageList(BaseModel):
    data: list[MessageSummary]
    next_cursor: str | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    ts: dt.datetime
    message_id: str
    recipient_id: str | None
    recipient: str | None
    detail: dict[str, Any]
