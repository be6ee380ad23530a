"""Keep secrets out of every message, file and log line.

A `Scrubber` holds the run's secrets (the API key, the callback token, the full callback URL)
and removes them from any text, in every form an echo may take:

- as is;
- percent-encoded (`%2F` or `%2f`, also every character, also encoded twice: `%252F`) or
  form-encoded (`+` for a space), as when a provider echoes a query string or a form body;
- JSON-escaped (`\\/` for `/`, `\\u0041`, `\\"`), as when it echoes the request's JSON body;
- HTML-escaped (`&amp;`, `&#47;`, `&#x2F;`), as in a proxy's error page.

It also redacts the user information of any URL (`https://user:password@host`), and the whole
query string of any URL (absolute or relative, plain or encoded)
that carries a signing parameter (`X-Amz-Signature`, `X-Amz-Credential`, `Signature`, `sig`,
`token`, `Expires`, ... see `is_signing_param`): a presigned input image or a signed result URL
grants access to whoever holds it, like the key. A `Bearer <token>` is redacted whatever the
token. The replacement is `REDACTED`.

`scrub_exception` applies the scrubber to an exception and to every exception chained to it
(`__cause__`, `__context__`, a `.cause` attribute): their arguments and string attributes are
rewritten in place, and a chained exception whose text still holds a secret (one whose message is
not in its arguments, such as a pydantic ValidationError) is cut from the chain.

A Scrubber is thread-safe: `add` may run while other threads scrub.

`ScrubbingFilter` applies a scrub function to the records of a logger, for libraries that log
URLs themselves (httpx logs every request line, query included).
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from urllib.parse import unquote, unquote_plus

from pydantic import SecretStr

REDACTED = "**********"

# query parameters whose presence makes a URL a credential: the whole query is redacted
_SIGNING_NAMES = frozenset(
    {
        "sig",
        "signature",
        "expires",
        "policy",
        "key-pair-id",
        "googleaccessid",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "token",
        "access_token",
        "apikey",
        "api_key",
        "key",
        "se",
        "sv",
        "skoid",
    }
)
_SIGNING_PARTS = ("signature", "token", "credential", "secret", "password")

# a query: its delimiter (plain, percent-encoded once or twice, JSON- or HTML-escaped), then
# everything up to whitespace, a quote or an angle bracket
_QUERY = re.compile(
    r"(?P<mark>\?|%3[fF]|%253[fF]|\\u003[fF]|&#0*63;|&#[xX]0*3[fF];)"
    r"(?P<query>[^\s\"'<>`]*)"
)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[^\s\"'<>`,;]+")
_AMP_FORMS = re.compile(r"(?i)%26|%2526|\\u0026|&amp;|&#0*38;|&#x0*26;")
_EQ_FORMS = re.compile(r"(?i)%3d|%253d|\\u003d|&#0*61;|&#x0*3d;")


def is_signing_param(name: str) -> bool:
    """True for a query parameter name that signs or authorises a URL (case-insensitive)."""
    low = name.strip().lower()
    return low in _SIGNING_NAMES or any(part in low for part in _SIGNING_PARTS)


def _param_names(query: str) -> list[str]:
    """The parameter names of a (possibly encoded or escaped) query string."""
    text = _EQ_FORMS.sub("=", _AMP_FORMS.sub("&", query))
    for _ in range(3):  # undo up to three layers of percent-encoding
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    text = html.unescape(text).replace("\\/", "/")
    return [part.split("=", 1)[0] for part in re.split(r"[&;]", text) if "=" in part]


def redact_signed_urls(text: str) -> str:
    """`text` with the whole query of every URL that carries a signing parameter redacted."""

    def replace(match: re.Match[str]) -> str:
        if any(is_signing_param(name) for name in _param_names(match["query"])):
            return match["mark"] + REDACTED
        return match[0]

    return _QUERY.sub(replace, text)


# the user information of an absolute URL (`scheme://user:password@host`, or mistyped with one
# slash): everything between the slashes and the last `@` before the host (a password may hold
# an `@` of its own), in which no `/`, `?`, `#`, space or quote may come
_USERINFO = re.compile(r"(?i)\b(?P<scheme>[a-z][a-z0-9+.-]*:/{1,2})(?P<userinfo>[^/?#\s\"'<>`]+)@")


def redact_urls(text: str) -> str:
    """`text` with the user information (`user:password@`) of every URL and the whole query of
    every signed URL redacted: for a URL a person typed (a manifest's), shown in a log line, a
    run name or a summary."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return redact_signed_urls(text)


def _hex(number: int, width: int) -> str:
    """A regex matching `number` as hex digits of at least `width`, in either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{number:0{width}x}")


def _char_pattern(char: str) -> str:
    """A regex matching `char` in any of the encodings an echo may use."""
    data = char.encode("utf-8")
    units = char.encode("utf-16-be")
    forms = [
        re.escape(char),
        "".join("%" + _hex(b, 2) for b in data),  # percent-encoded
        "".join("%25" + _hex(b, 2) for b in data),  # percent-encoded twice
        # JSON \uXXXX (a surrogate pair beyond the BMP)
        "".join(
            r"\\u" + _hex(int.from_bytes(units[i : i + 2], "big"), 4)
            for i in range(0, len(units), 2)
        ),
        f"&#0*{ord(char)};",  # HTML decimal and hex character references
        "&#[xX]0*" + _hex(ord(char), 1) + ";",
    ]
    escaped = json.dumps(char, ensure_ascii=False)[1:-1]  # JSON: \" \\ \n ...
    if escaped != char:
        forms.append(re.escape(escaped))
    named = html.escape(char)  # &amp; &lt; &quot; ...
    if named != char:
        forms.append(re.escape(named))
    if char == "/":
        forms.append(r"\\/")
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


#: a secret this short (a test key, a typo) is scrubbed only where it stands alone: inside
#: words it would mask half of every line, and names no secret anyone could use
SHORT_SECRET = 3


def _secret_pattern(secret: str) -> str:
    pattern = "".join(_char_pattern(c) for c in secret)
    if len(secret) > SHORT_SECRET:
        return pattern
    return rf"(?<![0-9A-Za-z])(?:{pattern})(?![0-9A-Za-z])"


def _as_text(secret: str | SecretStr | None) -> str:
    if isinstance(secret, SecretStr):
        return secret.get_secret_value()
    return secret or ""


class Scrubber:
    """Replaces registered secrets and signed URL queries in any text (see the module doc)."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._long_pattern: re.Pattern[str] | None = None  # secrets over SHORT_SECRET only
        for secret in secrets:
            self.add(secret)

    def __repr__(self) -> str:
        return f"Scrubber({len(self._secrets)} secrets)"

    def add(self, secret: str | SecretStr | None) -> None:
        """Scrub `secret` from now on (and its percent-decoded form). Empty values are ignored."""
        text = _as_text(secret)
        if not text:
            return
        with self._lock:
            new = {text, unquote(text), unquote_plus(text)} - self._secrets - {""}
            if not new:
                return
            self._secrets |= new
            # longest first: a callback URL is replaced whole before the token inside it
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(_secret_pattern(s) for s in ordered))
            longer = [s for s in ordered if len(s) > SHORT_SECRET]
            self._long_pattern = (
                re.compile("|".join(_secret_pattern(s) for s in longer)) if longer else None
            )

    def scrub_secrets(self, text: str) -> str:
        """`text` without any registered secret of more than `SHORT_SECRET` characters, in
        any encoding; signed URLs stay whole. For the string values of an API answer before
        anything reads them: a result URL must still work, and a 1-3 character test key
        would mask digits of every address and number."""
        pattern = self._long_pattern
        return pattern.sub(REDACTED, text) if pattern is not None and text else text

    def scrub(self, text: str) -> str:
        """`text` without any registered secret, signed URL query or bearer token."""
        if not text:
            return text
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
        return redact_urls(text)

    __call__ = scrub

    def leaks(self, text: str) -> bool:
        """True when `text` holds something `scrub` would remove."""
        return self.scrub(text) != text

    def scrub_exception(self, exc: BaseException) -> BaseException:
        """Scrub `exc` and its chain in place (see the module doc); returns `exc`."""
        seen: set[int] = set()
        todo: list[BaseException] = [exc]
        while todo:
            current = todo.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            self._scrub_one(current)
            for attr in ("__cause__", "__context__", "cause"):
                linked = getattr(current, attr, None)
                if not isinstance(linked, BaseException):
                    continue
                self._scrub_one(linked)
                if self._still_leaks(linked):
                    self._cut(current, attr)
                else:
                    todo.append(linked)
        return exc

    def _scrub_one(self, exc: BaseException) -> None:
        try:
            exc.args = tuple(self.scrub(a) if isinstance(a, str) else a for a in exc.args)
        except (AttributeError, TypeError):  # an exception type that refuses new args
            pass
        state = getattr(exc, "__dict__", None)
        if isinstance(state, dict):
            for name, value in list(state.items()):
                if isinstance(value, str):
                    state[name] = self.scrub(value)

    def _still_leaks(self, exc: BaseException) -> bool:
        try:
            return self.leaks(str(exc)) or self.leaks(repr(exc))
        except Exception:  # noqa: BLE001 - an exception that cannot even be printed is cut
            return True

    @staticmethod
    def _cut(parent: BaseException, attr: str) -> None:
        if attr == "__cause__":
            parent.__cause__ = None
            parent.__suppress_context__ = True
        elif attr == "__context__":
            parent.__context__ = None
        else:
            try:
                setattr(parent, attr, None)
            except AttributeError:
                pass


class ScrubbingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through `scrub` (never drops one).

    Attach it to the loggers that emit records (a filter on a parent logger does not see its
    children's records)."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left to logging
            return True
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True
