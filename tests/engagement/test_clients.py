"""Mail clients and devices of tracking hits (engagement/clients.py): real user agents,
each with where it comes from, named with exact labels; the data file's rules before
ua-parser's families; a bad data file named precisely; and client_of() total on
arbitrary text, its labels short and from a closed set of device classes.

Sources: "test_ua.yaml" is uap-core's tests/test_ua.yaml
(https://github.com/ua-parser/uap-core, commit e3c5e634, 2026-08-11); "regexes.yaml"
its regexes.yaml at the same commit; "MDN" is
https://developer.mozilla.org/docs/Web/HTTP/Headers/User-Agent; "UA reduction" is
Chromium's reduced user agent, https://www.chromium.org/updates/ua-reduction/.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.engagement.clients import (
    DEVICES,
    MAX_LABEL,
    TABLE,
    USER_AGENT_MAX,
    ClientRulesError,
    Table,
    _classify,
    classify,
    client_of,
    load_table,
)

# Gmail's image proxy, web and apps: https://darkvisitors.com/agents/googleimageproxy
# (and Word to the Wise, 2013-12, cited in verdicts.toml).
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
# The same, as test_ua.yaml has it.
GMAIL_PROXY_SHORT = "Firefox/11.0 (via ggpht.com GoogleImageProxy)"
# Gmail's prefetch from Google's addresses right after delivery (GMass,
# https://www.gmass.co/blog/false-opens-in-gmail/, via mautic/mautic#10245).
GMAIL_PREFETCH = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
# Apple Mail on macOS 10.15 (Mail 13): uap-core#528,
# https://github.com/ua-parser/uap-core/issues/528.
APPLE_MAIL_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_6) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
# Apple Mail Privacy Protection: uap-core#509, https://github.com/ua-parser/uap-core/issues/509.
APPLE_MPP = "Mozilla/5.0"
# Mail on iPhone: test_ua.yaml ("Mobile Safari UI/WKWebView" there).
IOS_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 12_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
# Mail on iPad: the same shape with iPadOS's "CPU OS" (medama-io/go-useragent#5 lists
# the iPhone ones, https://github.com/medama-io/go-useragent/issues/5).
IPAD_MAIL = (
    "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
# Outlook for Windows: test_ua.yaml (three shapes: Office's own, "ms-office" alone, and
# IE's with "Tablet PC"-like tokens, which must stay a desktop).
OUTLOOK_2016 = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.6326; Pro)"
OUTLOOK_MSOFFICE = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
OUTLOOK_IE_SHAPE = (
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/8.0; .NET4.0C; "
    ".NET4.0E; .NET CLR 2.0.50727; .NET CLR 3.0.30729; .NET CLR 3.5.30729; "
    "Microsoft Outlook 16.0.6366; ms-office; MSOffice 16)"
)
# Outlook for iOS: regexes.yaml's OS and device rules ("Outlook-(iOS)/\d+\.\d+\.prod\.iphone").
OUTLOOK_IOS = "Outlook-iOS/709.2226530.prod.iphone (3.24.1)"
# Outlook.com / Outlook on the web read in Edge: the page shows the browser's own string;
# test_ua.yaml's Edge on Windows 10.
OWA_EDGE = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/75.0.3763.0 Safari/537.36 Edg/75.0.131.0"
)
# Yahoo's image proxy: the string regexes.yaml names YahooMailProxy.
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
# Thunderbird: test_ua.yaml, Linux and Windows.
THUNDERBIRD_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:24.0) Gecko/20100101 Thunderbird/24.2.0"
THUNDERBIRD_WINDOWS = "Mozilla/5.0 (Windows NT 6.1; rv:45.0) Gecko/20100101 Thunderbird/45.0"
# Android's web view, as Android's Gmail app shows an IMAP or Exchange account's mail
# (the app cannot be told from another app's web view): test_ua.yaml.
ANDROID_WEBVIEW = (
    "Mozilla/5.0 (Linux; Android 9; Pixel 2 XL Build/PPP5.180610.010; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/68.0.3440.85 Mobile Safari/537.36"
)
# Browsers.
CHROME_WINDOWS = (  # UA reduction, desktop
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
CHROME_ANDROID_PHONE = (  # UA reduction, Android phone
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36"
)
CHROME_ANDROID_TABLET = (  # UA reduction, Android tablet: no "Mobile"
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
SAMSUNG_TABLET = (  # test_ua.yaml
    "Mozilla/5.0 (Linux; Android 5.0.2; SAMSUNG SM-T800 Build/LRX22G) AppleWebKit/537.36 "
    "(KHTML, like Gecko) SamsungBrowser/3.0 Chrome/38.0.2125.102 Safari/537.36"
)
SAFARI_IPHONE = (  # MDN
    "Mozilla/5.0 (iPhone; CPU iPhone OS 13_5_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/13.1.1 Mobile/15E148 Safari/604.1"
)
FIREFOX_WINDOWS = (  # MDN
    "Mozilla/5.0 (Windows NT 6.1; Win64; x64; rv:47.0) Gecko/20100101 Firefox/47.0"
)
# Browsers and apps on iOS that look like Mail but add their own token: test_ua.yaml.
BRAVE_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_7 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 Safari/604.1 Brave"
)
KAKAOTALK_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 Safari/604.1 KAKAOTALK/11.3.1 (INAPP)"
)
# A WebKit app on Linux: ua-parser's last resort calls it "Apple Mail"; it is not.
WEBKIT_LINUX = (  # test_ua.yaml's Apple Mail string, on another system
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/536.26.14 (KHTML, like Gecko)"
)
# Bots: curl's default ("curl/VERSION", https://curl.se/docs/manpage.html#-A), Google's
# crawler (https://developers.google.com/search/docs/crawling-indexing/overview-google-crawlers).
CURL = "curl/8.5.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GARBAGE = "".join(chr(0x21 + (i * 7919) % 94) for i in range(3000))

LABEL = re.compile(rf"[a-z0-9][a-z0-9.-]{{0,{MAX_LABEL - 1}}}")


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        (GMAIL_PROXY, ("gmail", "proxy")),
        (GMAIL_PROXY_SHORT, ("gmail", "proxy")),
        (GMAIL_PREFETCH, ("gmail", "bot")),
        (APPLE_MAIL_MAC, ("apple-mail", "desktop")),
        (APPLE_MPP, ("apple-mail", "proxy")),
        (IOS_MAIL, ("ios-mail", "mobile")),
        (IPAD_MAIL, ("ios-mail", "tablet")),
        (OUTLOOK_2016, ("outlook", "desktop")),
        (OUTLOOK_MSOFFICE, ("outlook", "desktop")),
        (OUTLOOK_IE_SHAPE, ("outlook", "desktop")),
        (OUTLOOK_IOS, ("outlook", "mobile")),
        (OWA_EDGE, ("edge", "desktop")),
        (YAHOO_PROXY, ("yahoo", "proxy")),
        (THUNDERBIRD_LINUX, ("thunderbird", "desktop")),
        (THUNDERBIRD_WINDOWS, ("thunderbird", "desktop")),
        (ANDROID_WEBVIEW, ("android-webview", "mobile")),
        (CHROME_WINDOWS, ("chrome", "desktop")),
        (CHROME_ANDROID_PHONE, ("chrome", "mobile")),
        (CHROME_ANDROID_TABLET, ("chrome", "tablet")),
        (SAMSUNG_TABLET, ("samsung-internet", "tablet")),
        (SAFARI_IPHONE, ("safari", "mobile")),
        (FIREFOX_WINDOWS, ("firefox", "desktop")),
        (BRAVE_IPHONE, ("brave", "mobile")),
        (KAKAOTALK_IPHONE, ("other", "mobile")),
        (WEBKIT_LINUX, ("webkit-app", "desktop")),
        (CURL, ("curl", "bot")),
        (GOOGLEBOT, ("other", "bot")),
        (None, ("other", "unknown")),
        ("", ("other", "unknown")),
        ("   ", ("other", "unknown")),
        (GARBAGE, ("other", "unknown")),
    ],
)
def test_real_user_agents_get_exact_labels(user_agent: str | None, expected: tuple[str, str]):
    assert client_of(user_agent) == expected


def test_ua_parser_would_name_these_otherwise():
    """The rules are needed: without them ua-parser's families say something else (a
    WKWebView for Mail on iOS, Edge for Gmail's prefetch, nothing for the MPP proxy)."""
    families_only = Table(rules=(), families=TABLE.families)
    assert classify(IOS_MAIL, families_only) == ("ios-webview", "mobile")
    assert classify(GMAIL_PREFETCH, families_only) == ("edge", "desktop")
    assert classify(APPLE_MPP, families_only) == ("other", "unknown")
    assert classify("Outlook-Android/2.0", families_only) == ("other", "mobile")
    assert client_of("Outlook-Android/2.0") == ("outlook", "mobile")


def test_only_the_first_characters_count():
    """Cut where the tracking endpoints cut what they store: what follows changes
    nothing, and a long string costs no more than a stored one."""
    assert client_of(GMAIL_PROXY + " " + GARBAGE) == ("gmail", "proxy")
    padded = "x" * USER_AGENT_MAX + GMAIL_PROXY
    assert client_of(padded) == ("other", "unknown")


def test_repeated_user_agents_come_from_the_cache():
    ua = CHROME_WINDOWS + " postwarden-cache-probe"
    client_of(ua)
    before = _classify.cache_info().hits
    assert client_of(ua) == ("chrome", "desktop")
    assert _classify.cache_info().hits == before + 1


def test_an_added_rule_comes_before_ua_parser():
    """How an operator or a later change extends the file: a [[rules]] entry first, a
    [families] entry for a name ua-parser already gives."""
    table = load_table(
        """
        [[rules]]
        name = "example-proxy"
        device = "proxy"
        user_agent = 'ExampleImageFetcher/\\d'

        [families]
        "Vivaldi" = "vivaldi"
        "Opera" = { name = "opera", device = "desktop" }
        """,
        "extra.toml",
    )
    assert classify("Mozilla/5.0 ExampleImageFetcher/2 (Chrome/131.0.0.0)", table) == (
        "example-proxy",
        "proxy",
    )
    vivaldi = CHROME_WINDOWS + " Vivaldi/7.0.3495.18"
    assert classify(vivaldi, table) == ("vivaldi", "desktop")
    assert classify(CHROME_WINDOWS, table) == ("other", "desktop")  # not listed here


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules = [", "bad.toml: "),
        ("[other]\n", "bad.toml: unknown key 'other'"),
        ("rules = 3", "bad.toml: rules: expected an array of tables [[rules]]"),
        ("families = 3", "bad.toml: families: expected a table [families]"),
        (
            "[[rules]]\nname = 'x'\nuser_agent = 'a'\nsize = 3",
            "bad.toml: rules[0]: size: unknown field",
        ),
        ("[[rules]]\nname = 'x'", "bad.toml: rules[0]: user_agent: expected a regular expression"),
        (
            "[[rules]]\nname = 'x'\nuser_agent = '('",
            "bad.toml: rules[0]: user_agent: bad regular expression",
        ),
        (
            "[[rules]]\nname = 'Apple Mail'\nuser_agent = 'a'",
            "bad.toml: rules[0]: name: expected lowercase letters, digits, - and . (at most 48)",
        ),
        (
            f"[[rules]]\nname = '{'a' * 49}'\nuser_agent = 'a'",
            "bad.toml: rules[0]: name: expected lowercase letters",
        ),
        (
            "[[rules]]\nname = 'x'\nuser_agent = 'a'\ndevice = 'phone'",
            "bad.toml: rules[0]: device: expected one of ['bot', 'desktop', 'mobile', "
            "'proxy', 'tablet', 'unknown'], got 'phone'",
        ),
        ("[families]\n'Chrome' = 3", "bad.toml: families.'Chrome': expected a label or a table"),
        ("[families]\n'Chrome' = 'Chrome'", "bad.toml: families.'Chrome': expected lowercase"),
        (
            "[families]\n'Chrome' = { name = 'chrome', os = 'x' }",
            "bad.toml: families.'Chrome': os: unknown field",
        ),
        (
            "[families]\n'Chrome' = { device = 'bot' }",
            "bad.toml: families.'Chrome': name: expected lowercase",
        ),
    ],
)
def test_a_bad_data_file_is_named_precisely(text: str, message: str):
    with pytest.raises(ClientRulesError) as info:
        load_table(text, "bad.toml")
    assert str(info.value).startswith(message)


def test_the_shipped_file_uses_every_device_class_it_fixes_correctly():
    fixed = {r.device for r in TABLE.rules} | {d for _, d in TABLE.families.values()}
    assert fixed - {None} <= DEVICES
    assert {"proxy", "bot"} <= fixed


KNOWN = [
    GMAIL_PROXY,
    APPLE_MAIL_MAC,
    IOS_MAIL,
    OUTLOOK_2016,
    ANDROID_WEBVIEW,
    SAFARI_IPHONE,
    CHROME_ANDROID_TABLET,
    YAHOO_PROXY,
]


@given(
    st.one_of(
        st.none(),
        st.text(max_size=600),
        st.builds(lambda a, b: a + b, st.sampled_from(KNOWN), st.text(max_size=80)),
        st.builds(lambda a, b: a + b, st.text(max_size=80), st.sampled_from(KNOWN)),
    )
)
@settings(max_examples=300, deadline=None)
def test_any_text_gets_two_short_labels(user_agent: str | None):
    client, device = client_of(user_agent)
    assert isinstance(client, str) and isinstance(device, str)
    assert LABEL.fullmatch(client), client
    assert device in DEVICES
    assert len(client) <= MAX_LABEL and len(device) <= MAX_LABEL
