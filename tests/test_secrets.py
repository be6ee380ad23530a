"""The Scrubber: registered secrets in any encoding, signed URL queries, exception chains."""

from __future__ import annotations

import html
import json
import logging
import pickle
import string
from collections.abc import Callable
from urllib.parse import quote, quote_plus, urlencode

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr, ValidationError

from hailuo_batch.secrets import (
    REDACTED,
    Scrubber,
    ScrubbingFilter,
    is_signing_param,
    redact_signed_urls,
    redact_urls,
)

TOKEN = "Zq3-vX_9kLm.Tp~4RwYb2NcD"
CALLBACK = f"https://hooks.example.com/prefix/callbacks/{TOKEN}"
KEY = "sk-live/ABC+def=ghi&jkl"  # characters that every encoding changes

ENCODINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda s: s,
    "percent": lambda s: quote(s, safe=""),
    "percent-keep-slash": lambda s: quote(s),
    "percent-lowercase-hex": lambda s: _lower_hex(quote(s, safe="")),
    "percent-twice": lambda s: quote(quote(s, safe=""), safe=""),
    "form": quote_plus,
    "json": lambda s: json.dumps(s)[1:-1],
    "json-ascii": lambda s: json.dumps(s, ensure_ascii=True)[1:-1],
    "json-escaped-slashes": lambda s: json.dumps(s).replace("/", "\\/")[1:-1],
    "html": html.escape,
    "html-numeric": lambda s: "".join(f"&#{ord(c)};" for c in s),
    "every-char-percent": lambda s: "".join(f"%{b:02X}" for b in s.encode()),
    "every-char-json": lambda s: "".join(_json_units(c) for c in s),
}


def _json_units(char: str) -> str:
    """`char` as JSON \\uXXXX escapes (a surrogate pair beyond the BMP)."""
    units = char.encode("utf-16-be")
    return "".join(
        f"\\u{int.from_bytes(units[i : i + 2], 'big'):04x}" for i in range(0, len(units), 2)
    )


def _lower_hex(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "%":
            out.append(text[i : i + 3].lower())
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def scrubber() -> Scrubber:
    return Scrubber([SecretStr(KEY), TOKEN, CALLBACK])


@pytest.mark.parametrize("secret", [KEY, TOKEN, CALLBACK])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_secret_is_removed_in_every_encoding(secret: str, encoding: str) -> None:
    encoded = ENCODINGS[encoding](secret)
    text = f'{{"message": "invalid request {encoded} refused", "n": 1}}'
    out = scrubber().scrub(text)
    assert encoded not in out
    assert secret not in out
    assert REDACTED in out
    assert out.startswith('{"message": "invalid request ') and out.endswith(' refused", "n": 1}')


def test_echoed_request_body_keeps_its_harmless_parts() -> None:
    body = json.dumps(
        {
            "request_type": "callback",
            "callback_url": CALLBACK,
            "input": {"prompt": "slow parallax", "duration": 6},
        }
    ).replace("/", "\\/")
    out = scrubber().scrub(f"400 Bad Request: echo {body}")
    assert TOKEN not in out and "Zq3" not in out
    assert "slow parallax" in out and '"duration": 6' in out


def test_token_alone_and_a_url_built_on_another_base_are_scrubbed() -> None:
    s = Scrubber([TOKEN])
    out = s.scrub(f"POST https://other.example.net/cb/{quote(TOKEN)} refused; token {TOKEN}")
    assert TOKEN not in out
    assert "https://other.example.net/cb/" in out


def test_add_later_and_secretstr() -> None:
    s = Scrubber()
    assert s.scrub(f"x {TOKEN} y") == f"x {TOKEN} y"
    s.add(SecretStr(TOKEN))
    s.add(None)
    s.add("")
    assert s.scrub(f"x {TOKEN} y") == f"x {REDACTED} y"
    assert TOKEN not in repr(s)


def test_longest_secret_first() -> None:
    out = scrubber().scrub(f"see {CALLBACK}!")
    assert out == f"see {REDACTED}!"


def test_bearer_token_redacted_whatever_its_value() -> None:
    out = Scrubber().scrub("headers: Authorization: Bearer sk-never-registered-123, Accept: */*")
    assert "sk-never-registered-123" not in out
    assert "Authorization: Bearer" in out and "Accept: */*" in out


# --- signed URLs -----------------------------------------------------------------------------

S3_PRESIGNED = (
    "https://bucket.s3.amazonaws.com/inputs/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)


@pytest.mark.parametrize(
    "url",
    [
        S3_PRESIGNED,
        "https://cdn.example.com/v.mp4?Expires=1700000000&Signature=abcDEF123~xyz&Key-Pair-Id=K2",
        "https://store.blob.core.windows.net/c/v.mp4?sv=2021&se=2025-01-01&sig=AbC%2Bdef%3D",
        "https://storage.googleapis.com/b/v.mp4?X-Goog-Signature=aa11bb22cc33",
        "https://cdn.example.com/v.mp4?token=tok_5f6e7d8c9b",
        "/files/v.mp4?sig=S3cr3tSig",
    ],
)
@pytest.mark.parametrize(
    "wrap",
    [
        lambda u: u,
        lambda u: quote(u, safe=""),
        lambda u: json.dumps(u).replace("/", "\\/"),
        lambda u: html.escape(u),
        lambda u: f"<a href='{u}'>here</a>",
    ],
)
def test_signed_url_query_is_redacted_whole(url: str, wrap: Callable[[str], str]) -> None:
    query = url.split("?", 1)[1]
    values = [p.split("=", 1)[1] for p in query.split("&")]
    out = Scrubber().scrub(f"GET failed for {wrap(url)} (HTTP 403)")
    for value in values:
        if len(value) >= 6:
            assert value not in out and quote(value, safe="") not in out
    assert REDACTED in out
    assert out.endswith(" (HTTP 403)")


@pytest.mark.parametrize(
    "text",
    [
        "https://cdn.example.com/v.mp4?w=640&h=360",
        "what? nothing signed here",
        "GET /api/v1/statusTask/hailuo-2-3-fast failed",
        "",
    ],
)
def test_unsigned_text_is_left_alone(text: str) -> None:
    assert Scrubber([TOKEN]).scrub(text) == text
    assert redact_signed_urls(text) == text


@pytest.mark.parametrize(
    ("name", "signing"),
    [
        ("X-Amz-Signature", True),
        ("x-amz-credential", True),
        ("X-Amz-Security-Token", True),
        ("Signature", True),
        ("sig", True),
        ("token", True),
        ("Expires", True),
        ("access_token", True),
        ("w", False),
        ("taskId", False),
        ("prefix", False),
    ],
)
def test_is_signing_param(name: str, signing: bool) -> None:
    assert is_signing_param(name) is signing


# --- properties ------------------------------------------------------------------------------

SECRET_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="*")


def test_a_very_short_secret_is_scrubbed_where_it_stands_alone_not_inside_words() -> None:
    """A one-letter key (a test key, a typo) masked inside every word made logs unreadable."""
    s = Scrubber(["k"])
    assert s.scrub("the key k was refused: k") == f"the key {REDACTED} was refused: {REDACTED}"
    assert s.scrub("Bad key?k=1&kk=2&x=%6B") == f"Bad key?{REDACTED}=1&kk=2&x={REDACTED}"
    assert Scrubber(["abcd"]).scrub("xabcdx") == f"x{REDACTED}x"  # longer: everywhere


@settings(max_examples=150, deadline=None)
@given(
    secret=st.text(SECRET_CHARS, min_size=1, max_size=3),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_property_a_short_secret_standing_alone_never_survives(
    secret: str, encoding: str, before: str, after: str
) -> None:
    encoded = ENCODINGS[encoding](secret)
    out = Scrubber([secret]).scrub(f"{before} {encoded} {after}")
    assert f" {encoded} " not in out


@settings(max_examples=150, deadline=None)
@given(
    secret=st.text(SECRET_CHARS, min_size=8, max_size=40),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_property_no_encoding_of_a_secret_survives(
    secret: str, encoding: str, before: str, after: str
) -> None:
    encoded = ENCODINGS[encoding](secret)
    out = Scrubber([secret]).scrub(before + encoded + after)
    assert secret not in out
    assert encoded not in out


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["X-Amz-Signature", "X-Amz-Credential", "Signature", "sig", "token"]),
    value=st.text(string.ascii_letters + string.digits + "-_~.%/+=", min_size=12, max_size=40),
    others=st.lists(st.tuples(st.sampled_from(["w", "h", "a"]), st.sampled_from(["1", "x"]))),
    position=st.integers(min_value=0, max_value=5),
    wrap=st.sampled_from(["plain", "percent", "json-escaped-slashes", "html"]),
)
def test_property_signature_never_survives(
    name: str, value: str, others: list[tuple[str, str]], position: int, wrap: str
) -> None:
    params = list(others)
    params.insert(min(position, len(params)), (name, value))
    url = "https://bucket.example.com/v.mp4?" + urlencode(params)
    out = Scrubber().scrub(f"error at {ENCODINGS[wrap](url)} end")
    assert quote_plus(value) not in out
    assert out.endswith(" end")


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_property_scrub_is_idempotent(text: str) -> None:
    s = scrubber()
    once = s.scrub(text)
    assert s.scrub(once) == once


# --- exceptions ------------------------------------------------------------------------------


class _Model(BaseModel):
    n: int


def _chain() -> RuntimeError:
    """An error whose cause and context both carry the token in their text."""
    try:
        try:
            _Model(n=TOKEN)  # type: ignore[arg-type]
        except ValidationError as inner:
            raise httpx.ReadTimeout(f"timed out posting to {CALLBACK}") from inner
    except httpx.ReadTimeout as exc:
        try:
            raise RuntimeError(f"wrapper {quote(TOKEN)}") from exc
        except RuntimeError as outer:
            return outer
    raise AssertionError("not reached")


def _texts(exc: BaseException | None) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += [str(exc), repr(exc), *map(str, exc.args)]
        exc = exc.__cause__ or exc.__context__
    return out


def test_scrub_exception_rewrites_the_chain_and_cuts_what_it_cannot_rewrite() -> None:
    exc = _chain()
    assert any(TOKEN in t for t in _texts(exc))  # the test is not vacuous
    scrubber().scrub_exception(exc)
    texts = _texts(exc)
    assert [t for t in texts if TOKEN in t or quote(TOKEN) in t] == []
    assert isinstance(exc.__cause__, httpx.ReadTimeout)  # rewritable: kept, scrubbed
    assert exc.__cause__.__cause__ is None  # a ValidationError cannot be rewritten: cut
    assert exc.__cause__.__context__ is None
    assert "timed out posting to" in str(exc.__cause__)
    clean = pickle.loads(pickle.dumps(exc))
    assert TOKEN not in str(clean)


def test_scrubbing_filter_rewrites_formatted_records(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.secrets.filtered")
    filt = ScrubbingFilter(scrubber().scrub)
    logger.addFilter(filt)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("posting to %s with %d tries", CALLBACK, 3)
            logger.info("plain %s", "text")
    finally:
        logger.removeFilter(filt)
    assert [r.getMessage() for r in caplog.records] == [
        f"posting to {REDACTED} with 3 tries",
        "plain text",
    ]


# --- user information in URLs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://bob:pw@h:8/m.csv", f"http://{REDACTED}@h:8/m.csv"),
        ("https://TOKEN@github.example/x.csv", f"https://{REDACTED}@github.example/x.csv"),
        ("s3://key:secret@bucket/m.csv", f"s3://{REDACTED}@bucket/m.csv"),
        (
            "manifest HTTP://u:p%40ss@h/m.csv?X-Amz-Signature=abc refused",
            f"manifest HTTP://{REDACTED}@h/m.csv?{REDACTED} refused",
        ),
        (
            "see 'http://a:b@h' and \"https://c@d/e\"",
            f"see 'http://{REDACTED}@h' and \"https://{REDACTED}@d/e\"",
        ),
    ],
)
def test_a_urls_user_information_is_redacted(text: str, shown: str) -> None:
    assert redact_urls(text) == shown
    assert Scrubber([]).scrub(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "http://h:80/p@q",  # an @ in the path is no user information
        "http://a.com?x=1@b",
        "http://a.com#frag@b",
        "mail bob@example.com about http://h/x",
        "s3://bucket/k@v.csv",
    ],
)
def test_an_at_sign_after_the_host_is_left_alone(text: str) -> None:
    assert redact_urls(text) == text


@given(
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="/?#@\"'<>`"
        ),
        min_size=1,
    )
)
def test_no_user_information_survives_the_scrubber(secret: str) -> None:
    text = f"cannot read http://{secret}@example.com/m.csv: 404"
    assert Scrubber([]).scrub(text) == f"cannot read http://{REDACTED}@example.com/m.csv: 404"


def test_a_password_with_an_at_sign_is_redacted_whole() -> None:
    """As urlsplit reads it: the user information ends at the last `@` before the host."""
    assert redact_urls("https://user:p@ss@host/x") == f"https://{REDACTED}@host/x"
