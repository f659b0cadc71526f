"""Verdicts on tracking hits (docs/verdicts.md): each shipped rule with a hit it
matches and one it narrowly does not, the order of hits not mattering, the operator's
file overriding and extending, a bad file named precisely, a person judged a person,
and judge() total on arbitrary hits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.engagement.verdicts import (
    PERSON,
    Hit,
    Rules,
    Verdict,
    VerdictRulesError,
    judge,
    load_rules,
)

RULES = load_rules()
DELIVERED = 1_800_000_000.0
LATER = DELIVERED + 3 * 3600  # hours after delivery: no timing rule applies
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.18227; Pro)"
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
HOME_IP = "198.51.100.23"  # documentation range: nobody's scanner


def hit(**kw: object) -> Hit:
    base: dict[str, object] = {
        "id": 1,
        "kind": "click",
        "at": LATER,
        "method": "GET",
        "ip": HOME_IP,
        "user_agent": CHROME,
        "link_index": 0,
        "delivered_at": DELIVERED,
        "mx": "mx.example.net",
        "links_in_message": 3,
    }
    base.update(kw)
    return Hit(**base)  # type: ignore[arg-type]


def one(h: Hit, rules: Rules = RULES) -> Verdict:
    return judge([h], rules)[h.id]


def machine(reason: str) -> Verdict:
    return Verdict(True, reason)


HUMAN = Verdict(False, PERSON)


# -- a person ------------------------------------------------------------------------


def test_a_persons_hits_are_a_persons() -> None:
    hits = [
        hit(id=1, kind="open", link_index=None, user_agent=OUTLOOK, at=LATER),
        hit(id=2, kind="open", link_index=None, user_agent=FIREFOX, at=LATER + 7200),
        hit(id=3, kind="click", link_index=1, user_agent=CHROME, at=LATER + 240),
        hit(id=4, kind="open", link_index=None, user_agent=GMAIL_PROXY, ip="66.249.84.1"),
        hit(id=5, kind="open", link_index=None, user_agent=IPHONE_MAIL, at=LATER + 60),
        hit(id=6, link_index=0, user_agent=FIREFOX, ip="2001:db8:5::7", at=LATER + 3600),
    ]
    assert judge(hits, RULES) == {h.id: HUMAN for h in hits}


def test_no_hits_no_verdicts() -> None:
    assert judge([], RULES) == {}


# -- user agents ---------------------------------------------------------------------


def test_apple_mpp_proxy_is_an_open_by_the_bare_user_agent() -> None:
    assert one(hit(kind="open", user_agent="Mozilla/5.0")) == machine("apple-mpp-proxy")
    # Apple Mail itself, showing the message to a person, says more than that
    assert one(hit(kind="open", user_agent=IPHONE_MAIL)) == HUMAN
    assert one(hit(kind="open", user_agent="Mozilla/5.0 (Macintosh)")) == HUMAN


GMAIL_BOT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
REAL_EDGE_12 = GMAIL_BOT.removesuffix(" Mozilla/5.0")


@pytest.mark.parametrize(
    ("ua", "reason"),
    [
        (GMAIL_BOT, "gmail-prefetch-bot"),
        ("Mozilla/5.0 (compatible; Barracuda Link Protection)", "scanner-user-agent"),
        ("Proofpoint URL Defense/1.0", "scanner-user-agent"),
        ("Mimecast-URL-Protect", "scanner-user-agent"),
        ("Cisco IronPort URL scanner", "scanner-user-agent"),
        ("Symantec Messaging Gateway", "scanner-user-agent"),
        ("TrendMicro Email Security", "scanner-user-agent"),
        ("Microsoft Office Existence Discovery", "scanner-user-agent"),
        (CHROME.replace("Chrome/", "HeadlessChrome/"), "headless-or-http-library"),
        ("curl/8.5.0", "headless-or-http-library"),
        ("python-requests/2.32.3", "headless-or-http-library"),
        ("Python-urllib/3.12", "headless-or-http-library"),
        ("Go-http-client/1.1", "headless-or-http-library"),
        ("okhttp/4.12.0", "headless-or-http-library"),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "crawler-or-preview"),
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "crawler-or-preview",
        ),
        ("", "empty-user-agent"),
        ("   ", "empty-user-agent"),
    ],
)
def test_machine_user_agents(ua: str, reason: str) -> None:
    assert one(hit(user_agent=ua)) == machine(reason)
    assert one(hit(kind="open", link_index=None, user_agent=ua)) == machine(reason)


@pytest.mark.parametrize(
    "ua",
    [
        CHROME,
        FIREFOX,
        OUTLOOK,  # Outlook loading a person's images: not "Existence Discovery"
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) [FBAN/FBIOS;FBAV/490.0]",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.104 Mobile Safari/537.36",
        "-",
        GMAIL_PROXY,
        REAL_EDGE_12,
    ],
)
def test_person_user_agents(ua: str) -> None:
    assert one(hit(user_agent=ua)) == HUMAN


# -- networks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "kind", "verdict"),
    [
        ("40.92.1.2", "click", machine("microsoft-eop-network")),
        ("40.93.255.255", "click", machine("microsoft-eop-network")),
        ("40.94.0.1", "click", HUMAN),  # just past 40.92.0.0/15
        ("40.92.1.2", "open", HUMAN),  # Outlook on the web loads a person's images
        ("2a01:111:f400:7e00::1", "click", machine("microsoft-eop-network")),
        ("2a01:111:f401::1", "click", HUMAN),
        ("67.231.159.255", "open", machine("proofpoint-network")),
        ("67.231.160.0", "open", HUMAN),
        ("205.139.111.9", "click", machine("mimecast-network")),
        ("205.139.112.9", "click", HUMAN),
        ("209.222.87.255", "click", machine("barracuda-network")),
        ("209.222.88.0", "click", HUMAN),
        ("not an address", "click", HUMAN),
        (None, "click", HUMAN),
    ],
)
def test_vendor_networks(ip: str | None, kind: str, verdict: Verdict) -> None:
    assert one(hit(ip=ip, kind=kind)) == verdict


@pytest.mark.parametrize(
    ("ip", "prefix", "verdict"),
    [
        # truncated to /24 inside a /20: every address it stands for is Proofpoint's
        ("67.231.150.0", 24, machine("proofpoint-network")),
        ("67.231.150.0/24", None, machine("proofpoint-network")),
        # truncated to /24 around a /26: it may or may not have been inside
        ("209.66.100.0", 24, HUMAN),
        ("209.66.100.70", None, machine("proofpoint-network")),
        # IPv6 truncated to /48 on a /48 range: as wide, so it matches
        ("2a01:111:f400::", 48, machine("microsoft-eop-network")),
        ("2a01:111:f403:8000::", 48, machine("microsoft-eop-network")),
        ("2a01:111::", 32, HUMAN),
    ],
)
def test_truncated_addresses_match_only_wider_ranges(
    ip: str, prefix: int | None, verdict: Verdict
) -> None:
    assert one(hit(ip=ip, ip_prefix=prefix)) == verdict


# -- methods and ranges --------------------------------------------------------------


def test_head_request() -> None:
    assert one(hit(method="HEAD")) == machine("head-request")
    assert one(hit(method="head", kind="open")) == machine("head-request")
    assert one(hit(method="OPTIONS")) == machine("head-request")
    assert one(hit(method="GET")) == HUMAN
    assert one(hit(method="POST")) == HUMAN


def test_ranged_request() -> None:
    assert one(hit(ranged=True)) == machine("ranged-request")
    assert one(hit(ranged=False)) == HUMAN


# -- timing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mx",
    [
        "mx0a-00123.pphosted.com",
        "MX1.PPHOSTED.COM.",
        "eu-smtp-inbound-1.mimecast.com",
        "d123.ess.barracudanetworks.com",
        "example-com.mail.protection.outlook.com",
    ],
)
def test_gateway_mx_click_within_a_minute(mx: str) -> None:
    assert one(hit(mx=mx, at=DELIVERED + 59.9)) == machine("gateway-mx-click")
    assert one(hit(mx=mx, at=DELIVERED + 60)) == HUMAN
    assert one(hit(mx=mx, at=DELIVERED + 30, kind="open", link_index=None)) == HUMAN


@pytest.mark.parametrize("mx", ["notpphosted.com", "pphosted.com.example.net", None, ""])
def test_gateway_mx_needs_the_gateways_domain(mx: str | None) -> None:
    assert one(hit(mx=mx, at=DELIVERED + 30)) == HUMAN


def test_click_at_delivery() -> None:
    assert one(hit(at=DELIVERED + 9.9)) == machine("click-at-delivery")
    assert one(hit(at=DELIVERED - 3)) == machine("click-at-delivery")  # before it was recorded
    assert one(hit(at=DELIVERED + 10)) == HUMAN
    assert one(hit(at=DELIVERED + 1, delivered_at=None)) == HUMAN
    assert one(hit(at=DELIVERED + 1, kind="open", link_index=None)) == HUMAN


def clicks(times: list[float], links: list[int], total: int = 3) -> list[Hit]:
    return [
        hit(id=i, at=LATER + t, link_index=n, links_in_message=total)
        for i, (t, n) in enumerate(zip(times, links, strict=True))
    ]


def test_every_link_at_once() -> None:
    burst = clicks([0, 1, 5], [0, 1, 2])
    assert judge(burst, RULES) == {h.id: machine("every-link-at-once") for h in burst}
    # a person's later click of a link stays a person's
    later = [*burst, hit(id=9, at=LATER + 600, link_index=1)]
    assert judge(later, RULES)[9] == HUMAN


@pytest.mark.parametrize(
    ("times", "links", "total"),
    [
        ([0, 1, 5.1], [0, 1, 2], 3),  # spread over just more than 5 s
        ([0, 1, 2], [0, 1, 1], 3),  # a link never clicked
        ([0, 0.5], [0, 0], 1),  # one link: min_links is 2
        ([0, 0.5, 1], [0, 1, 2], None),  # how many links is unknown
    ],
)
def test_not_every_link_at_once(times: list[float], links: list[int], total: int | None) -> None:
    assert set(judge(clicks(times, links, total), RULES).values()) == {HUMAN}  # type: ignore[arg-type]


def test_pixel_then_click_marks_both() -> None:
    hits = [
        hit(id=1, kind="open", link_index=None, at=LATER),
        hit(id=2, at=LATER + 1.9),
    ]
    assert judge(hits, RULES) == {1: machine("pixel-then-click"), 2: machine("pixel-then-click")}


@pytest.mark.parametrize("gap", [2.0, -0.5, 300])
def test_pixel_then_click_needs_the_open_just_before(gap: float) -> None:
    hits = [hit(id=1, kind="open", link_index=None, at=LATER), hit(id=2, at=LATER + gap)]
    assert judge(hits, RULES) == {1: HUMAN, 2: HUMAN}


# -- order and togetherness ----------------------------------------------------------

MIXED = [
    hit(id=1, kind="open", link_index=None, user_agent="Mozilla/5.0", at=DELIVERED + 2),
    hit(id=2, at=DELIVERED + 1, mx="mx1.pphosted.com", user_agent=CHROME),
    hit(id=3, at=LATER, link_index=0),
    hit(id=4, at=LATER + 0.4, link_index=1),
    hit(id=5, at=LATER + 0.9, link_index=2),
    hit(id=6, kind="open", link_index=None, at=LATER + 900),
    hit(id=7, at=LATER + 901, link_index=2),
    hit(id=8, kind="open", link_index=None, at=LATER + 5000, user_agent=OUTLOOK),
    hit(id=9, at=LATER + 5300, link_index=1, method="HEAD"),
]
EXPECTED = {
    1: machine("apple-mpp-proxy"),
    2: machine("gateway-mx-click"),
    3: machine("every-link-at-once"),
    4: machine("every-link-at-once"),
    5: machine("every-link-at-once"),
    6: machine("pixel-then-click"),
    7: machine("pixel-then-click"),
    8: HUMAN,
    9: machine("head-request"),
}


def test_a_message_judged_together() -> None:
    assert judge(MIXED, RULES) == EXPECTED


@given(st.permutations(MIXED))
@settings(max_examples=60, deadline=None)
def test_order_of_hits_does_not_matter(hits: list[Hit]) -> None:
    assert judge(hits, RULES) == EXPECTED


# -- the operator's file -------------------------------------------------------------


def operator(tmp_path: Path, text: str) -> Rules:
    path = tmp_path / "verdicts.toml"
    path.write_text(text)
    return load_rules(path)


def test_operator_rules_come_first_and_extend(tmp_path: Path) -> None:
    rules = operator(
        tmp_path,
        """
        [[rules]]
        name = "our-uptime-monitor"
        machine = false
        user_agent = ['^curl/.* our-monitor$']

        [[rules]]
        name = "corporate-sandbox"
        ip = ["203.0.113.0/24", "2001:db8:77::/48"]
        """,
    )
    assert rules.names[:2] == ("our-uptime-monitor", "corporate-sandbox")
    assert set(RULES.names) < set(rules.names)
    assert one(hit(user_agent="curl/8.5 our-monitor"), rules) == Verdict(
        False, "our-uptime-monitor"
    )
    assert one(hit(user_agent="curl/8.5"), rules) == machine("headless-or-http-library")
    assert one(hit(ip="203.0.113.9"), rules) == machine("corporate-sandbox")
    assert one(hit(ip="2001:db8:77:1::9", kind="open"), rules) == machine("corporate-sandbox")
    assert one(hit(ip="203.0.114.9"), rules) == HUMAN


def test_operator_rule_replaces_or_removes_a_shipped_one(tmp_path: Path) -> None:
    rules = operator(
        tmp_path,
        """
        [[rules]]
        name = "click-at-delivery"
        kinds = ["click"]
        after_delivery = 30

        [[rules]]
        name = "head-request"
        enabled = false
        """,
    )
    assert rules.names.count("click-at-delivery") == 1
    assert "head-request" not in rules.names
    assert one(hit(at=DELIVERED + 20), rules) == machine("click-at-delivery")
    assert one(hit(at=DELIVERED + 20)) == HUMAN
    assert one(hit(method="HEAD"), rules) == HUMAN


def test_horizon_is_the_longest_joining_window(tmp_path: Path) -> None:
    assert RULES.horizon == 5
    rules = operator(tmp_path, '[[rules]]\nname = "slow-pair"\nbefore_click = 45\n')
    assert rules.horizon == 45


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            '[[rules]]\nname = "x"\nuser_agent = ["ok", "(unclosed"]\n',
            "'x': user_agent[1]: bad regular",
        ),
        ('[[rules]]\nname = "x"\nip = ["10.0.0.0/33"]\n', "'x': ip[0]: not a network"),
        ('[[rules]]\nname = "x"\nip = ["10.0.0.1/8"]\n', "'x': ip[0]: not a network"),
        (
            '[[rules]]\nname = "x"\nafter_delivery = -1\n',
            "'x': after_delivery: expected a positive",
        ),
        (
            '[[rules]]\nname = "x"\nburst = "soon"\nkinds = ["click"]\n',
            "'x': burst: expected a positive",
        ),
        ('[[rules]]\nname = "x"\nburst = 3\n', "'x': kinds: a burst rule judges clicks"),
        ('[[rules]]\nname = "x"\nburst = 3\nkinds = ["click"]\nmin_links = 1\n', "'x': min_links:"),
        ('[[rules]]\nname = "x"\nmethod = ["HEAD"]\nkinds = ["bounce"]\n', "'x': kinds: expected"),
        ('[[rules]]\nname = "x"\nmethod = "HEAD"\n', "'x': method: expected a non-empty list"),
        ('[[rules]]\nname = "x"\nmx = [""]\n', "'x': mx[0]: expected a non-empty string"),
        (
            '[[rules]]\nname = "x"\nuser_agent = ["a"]\nmachnie = false\n',
            "'x': machnie: unknown field",
        ),
        (
            '[[rules]]\nname = "x"\nmachine = false\n',
            "'x': name: a rule needs at least one condition",
        ),
        ('[[rules]]\nname = "x"\nranged = "yes"\n', "'x': ranged: expected true or false"),
        ('[[rules]]\nname = "Bad Name"\nranged = true\n', "rules[0]: name: expected lowercase"),
        ("[[rules]]\nranged = true\n", "rules[0]: name:"),
        ('[[rules]]\nname = "person"\nranged = true\n', "'person': name:"),
        (
            '[[rules]]\nname = "x"\nranged = true\n[[rules]]\nname = "x"\nranged = true\n',
            "rules[1] 'x': name: used twice",
        ),
        ("rules = 3\n", "rules: expected an array of tables"),
        ('[[rule]]\nname = "x"\n', "unknown key 'rule'"),
        ('[[rules]\nname = "x"\n', ""),  # TOML syntax: tomllib's message, after the file
    ],
)
def test_bad_file_names_file_rule_and_field(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(VerdictRulesError) as err:
        operator(tmp_path, text)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'verdicts.toml'}: ")
    assert where in message


def test_no_operator_file() -> None:
    assert load_rules("") == load_rules(None) == RULES


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VerdictRulesError, match=r"nowhere\.toml"):
        load_rules(tmp_path / "nowhere.toml")


# -- judge is total --------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.ip_addresses().map(str),
    st.sampled_from(["67.231.150.0", "2a01:111:f400::", "40.92.0.0/15", "1.2.3.4/33"]),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [DELIVERED, DELIVERED + 1, DELIVERED + 30]
)
HITS = st.builds(
    Hit,
    id=st.integers(),
    kind=st.sampled_from(["open", "click"]) | st.text(max_size=5),
    at=FLOATS,
    method=st.sampled_from(["GET", "HEAD"]) | st.text(max_size=8),
    ip=ADDRESSES,
    user_agent=st.sampled_from(["Mozilla/5.0", CHROME, ""]) | st.text(max_size=40),
    link_index=st.none() | st.integers(-3, 5),
    delivered_at=st.none() | FLOATS,
    mx=st.none() | st.sampled_from(["mx1.pphosted.com"]) | st.text(max_size=20),
    links_in_message=st.none() | st.integers(-2, 6),
    ranged=st.booleans(),
    ip_prefix=st.none() | st.integers(-5, 200),
)


@given(st.lists(HITS, max_size=25))
@settings(max_examples=300, deadline=None)
def test_judge_never_raises_and_judges_every_hit(hits: list[Hit]) -> None:
    verdicts = judge(hits, RULES)
    assert set(verdicts) == {h.id for h in hits}
    for v in verdicts.values():
        assert v.reason in RULES.names or v == HUMAN


def test_hits_and_verdicts_are_values() -> None:
    h = hit()
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.at = 0  # type: ignore[misc]
    assert hash(h) == hash(hit())


def test_the_documented_example_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "verdicts.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    rules = operator(tmp_path, example)
    assert rules.names[0] == "acme-sandbox"
    assert "ranged-request" not in rules.names
    assert one(hit(ip="192.0.2.5"), rules) == Verdict(False, "kiosk-browsers")
    assert one(hit(at=DELIVERED + 20), rules) == machine("click-at-delivery")
