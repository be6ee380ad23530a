"""All configuration in one place: one pydantic-settings class read from the environment.

Every knob has an environment variable. The API key is `APIXO_API_KEY` and the base URL
`APIXO_BASE_URL` (the provider's own names); everything else is `HAILUO_*`. S3 endpoints and
credentials are *not* settings here: s3fs/botocore read the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), so any
S3-compatible store works unchanged.
"""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

import fsspec
import httpx
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from hailuo_batch.apixo import DEFAULT_BASE_URL, ApixoClient, MissingAPIKeyError, RetryPolicy
from hailuo_batch.apixo.transport import decoded_url, header_safe
from hailuo_batch.netguard import S3_BUCKET
from hailuo_batch.secrets import redact_urls

FailClass = Literal["content", "bad_input", "transient", "balance", "unknown"]
ENV_PREFIX = "HAILUO_"
#: the prefixes of the variables these settings read (APIXO_API_KEY and APIXO_BASE_URL)
VARIABLE_PREFIXES = (ENV_PREFIX, "APIXO_")
MAX_DURATION_S = 7 * 24 * 3600
"""The upper bound of every `*_S` setting (a timer past ~9.2e9 s overflows)."""
MAX_PRICE_USD = 1000.0
"""The upper bound of a price setting (a clip costs cents)."""
#: output protocols a store may use (besides a plain local path)
OUTPUT_PROTOCOLS = ("file", "s3")
#: HAILUO_* variables read outside these settings (not typos)
OTHER_VARIABLES = ("HAILUO_PROJECT_DIR", "HAILUO_DEMO_DIR", "HAILUO_DEMO_PREFECT_PORT")
API_ROOT = f"the API's root, such as {DEFAULT_BASE_URL}"
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


class BadSettingError(ValueError):
    """A setting or option is malformed; the message names it and says what to write instead."""


def check_output_url(url: str, *, name: str = "output") -> str:
    """`url` (stripped) if it is a usable output location, else `BadSettingError`.

    Accepted: a plain local path, `file://...` and `s3://bucket[/prefix]` (s3fs). Refused with
    a message that says what to write: empty, chained (`a::b`), control characters, a scheme
    without `//` (`s3:/bucket`, `s3:bucket`: a local folder named `s3:` is never what was
    meant), and any other protocol, whether fsspec knows it or not (`gs://`, `htp://`).
    `name` is how the caller calls the setting (`--output`, `HAILUO_OUTPUT`).
    """
    if not isinstance(url, str) or not url.strip():
        raise BadSettingError(f"{name} is empty: give a local folder or s3://bucket/prefix")
    url = url.strip()
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in url):
        raise BadSettingError(f"{name} {url!r} contains a control character: remove it")
    if "::" in url:
        raise BadSettingError(
            f"{name} {url!r} is a chained URL ('::'): give a local folder or s3://bucket/prefix"
        )
    match = _SCHEME_PREFIX.match(url)
    if match is None:
        if "://" in url:
            raise BadSettingError(
                f"{name} {url!r} is not understood: give a local folder or s3://bucket/prefix"
            )
        if ":" in url.split("/", 1)[0]:
            raise BadSettingError(
                f"{name} {url!r} starts with a ':' that may be read as a URL scheme: write "
                f"./{url} for a local folder of that name, or s3://bucket/prefix"
            )
        return _not_root(url, url, name)
    scheme = match.group(1)
    rest = url[match.end() :]
    if not rest.startswith("//"):
        if scheme.lower() in OUTPUT_PROTOCOLS or _protocol_installed(scheme.lower()):
            raise BadSettingError(
                f"{name} {url!r} looks like a {scheme.lower()}:// URL but lacks '//': write "
                f"{scheme.lower()}://{rest.lstrip('/')} (or ./{url} for a local folder with ':' "
                "in its name)"
            )
        raise BadSettingError(
            f"{name} {url!r} starts with '{scheme}:', which reads as a URL scheme: write "
            f"./{url} for a local folder of that name, or s3://bucket/prefix"
        )
    if scheme not in OUTPUT_PROTOCOLS:
        hint = ""
        if scheme.lower() in OUTPUT_PROTOCOLS:
            hint = f" (write {scheme.lower()}:// in lower case)"
        elif not _protocol_installed(scheme):
            hint = " (this protocol is not installed or not known)"
        raise BadSettingError(
            f"{name} {url!r}: protocol {scheme}:// is not supported{hint}; "
            "give a local folder, file:///path or s3://bucket/prefix"
        )
    if scheme == "s3":
        bucket = rest[2:].split("/", 1)[0]
        if not bucket:
            raise BadSettingError(f"{name} {url!r} names no bucket: write s3://bucket/prefix")
        if not S3_BUCKET.fullmatch(bucket) or ".." in bucket:
            raise BadSettingError(
                f"{name} {url!r}: {bucket!r} is not a valid S3 bucket name (3-63 lower-case "
                "letters, digits, dots and hyphens)"
            )
        if not _protocol_installed("s3"):
            raise BadSettingError(f"{name} {url!r}: s3:// needs the s3fs package installed")
    elif not rest[2:]:
        raise BadSettingError(f"{name} {url!r} names no folder: write file:///path/to/folder")
    else:
        _not_root(url, urlsplit(url).path or "/", name)
    return url


def check_block_name(block: str | None, *, name: str) -> str | None:
    """`block`, or None when no block is named; an empty name is a bad setting, never read as
    "no block" (the environment's key or output would be used instead, silently). `name` is
    how the caller calls the setting (`--credentials-block`, `storage_block`)."""
    if block is not None and not block.strip():
        raise BadSettingError(f"{name} is empty: give a block name, or leave it out")
    return block


def _not_root(url: str, path: str, name: str) -> str:
    """`url`, unless its local `path` is the file system's root (a run would spread its
    ledger, claims and videos over `/`), or a file, or a folder inside a file (the run would
    fail with FileExistsError after its Prefect server started)."""
    full = os.path.normpath(os.path.abspath(path))
    if not full.strip(os.sep):
        raise BadSettingError(
            f"{name} {url!r} is the file system's root: give a folder of its own, such as "
            "./output or /data/videos"
        )
    at = full
    while not os.path.lexists(at) and os.path.dirname(at) != at:
        at = os.path.dirname(at)
    if os.path.lexists(at) and not os.path.isdir(at):
        where = "is a file" if at == full else f"is inside {at!r}, which is a file"
        raise BadSettingError(
            f"{name} {url!r} {where}: it must be a folder (new or existing); give the path "
            "of a folder instead"
        )
    return url


def _protocol_installed(protocol: str) -> bool:
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return False
    return True


def output_is_local(url: str) -> bool:
    """True for an output that is a local folder (plain path or file://), after checking it."""
    return not check_output_url(url).startswith("s3://")


class Settings(BaseSettings):
    """Settings for the client, the flow, the CLI and the receiver."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    # --- provider -----------------------------------------------------------------------------
    apixo_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("APIXO_API_KEY", "apixo_api_key"),
        description="apixo API key (Bearer token). Never logged.",
    )
    apixo_base_url: str = Field(
        default=DEFAULT_BASE_URL,
        validation_alias=AliasChoices("APIXO_BASE_URL", "apixo_base_url"),
        description="apixo API base URL; point it at `hailuo-batch emulator` for local runs.",
    )

    # --- HTTP transport -----------------------------------------------------------------------
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Read timeout per response chunk.")
    retry_max_attempts: int = Field(
        6,
        ge=1,
        le=50,
        description="Attempts per API call. Reads (status, balance, download) retry 429, 5xx and "
        "transport errors; a submit retries only refusals that prove no task was created (503, "
        "a connection that never reached the server, and 429 outside a run: a run's submits "
        "hand their 429 to its concurrency limiter instead).",
    )
    retry_max_elapsed_s: float = Field(
        120.0, gt=0, description="Give up retrying one call after this many seconds in total."
    )
    retry_base_s: float = Field(1.0, gt=0, description="First backoff delay; doubles each retry.")
    retry_max_s: float = Field(30.0, gt=0, description="Cap on one backoff delay.")

    store_retry_delay_s: float = Field(
        2.0,
        ge=0,
        description="A broken video download is retried twice, after this and 5x this delay.",
    )

    # --- polling (provider guidance: 60 s first read, every 15 s x1.5 capped 30 s, 10 min) ------
    poll_initial_s: float = Field(60.0, ge=0, description="Wait before the first status read.")
    poll_interval_s: float = Field(15.0, gt=0, description="Interval between status reads.")
    poll_backoff: float = Field(1.5, ge=1.0, description="Interval multiplier after each read.")
    poll_max_interval_s: float = Field(30.0, gt=0, description="Cap on the poll interval.")
    poll_timeout_s: float = Field(600.0, gt=0, description="Give up on a task after this long.")
    not_found_grace_s: float = Field(
        60.0, ge=0, description="A 404 on a task we created is transient for this long."
    )

    # --- failure policy -----------------------------------------------------------------------
    transient_max_resubmits: int = Field(
        2,
        ge=0,
        le=10,
        description="Resubmissions of an item after a transient failCode (POSTs of unknown "
        "outcome do not count: they are reported uncertain; a rerun starts the count again).",
    )
    rate_limit_patience_s: float = Field(
        1800.0,
        gt=0,
        description="How long submissions refused with 429 are tried again: an item refused "
        "this long gives up; a run whose every submission was refused this long stops.",
    )
    failcode_policy: dict[str, FailClass] = Field(
        default_factory=dict,
        description='Overrides of the failCode table, JSON: {"GENERATION_FAILED": "bad_input"}.',
    )

    # --- resume and claims --------------------------------------------------------------------
    uncertain_policy: Literal["resubmit", "hold"] = Field(
        "resubmit",
        description="Items whose earlier POST has an unknown outcome: resubmit them, or hold them "
        "for a person (status `uncertain`).",
    )
    lease_ttl_s: float = Field(
        120.0,
        ge=1,
        description="A run that has not renewed its lease for this long is dead; its claims on "
        "items may be taken over by another run. At least 1 s: a run renews it every eighth of "
        "this (at most twice a second), and one that could not is stopped from submitting.",
    )

    max_video_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        description="A result video longer than this is refused while it downloads (the item "
        "ends DOWNLOAD_FAILED, nothing is stored), so an endless or inflating body never fills "
        "the output's disk. A clip of this model is a few MB.",
    )

    # --- input images -------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Input image size limit.")
    fetch_timeout_s: float = Field(20.0, gt=0, description="Time limit on one image fetch.")
    allow_private_networks: bool = Field(
        False,
        description="Allow http(s) image URLs on private, loopback and link-local addresses.",
    )

    # --- money --------------------------------------------------------------------------------
    # at least a tenth of a cent: at a price of 0 (or 1e-300) the cap would hold nothing back
    price_standard_6s_usd: float = Field(0.19, ge=0.001, description="Price of a 6 s 768p clip.")
    price_standard_10s_usd: float = Field(0.32, ge=0.001, description="Price of a 10 s 768p clip.")
    price_pro_usd: float = Field(
        0.33, ge=0.001, description="Price of a 1080p pro clip (per task)."
    )

    # --- output -------------------------------------------------------------------------------
    output: str = Field("./output", description="Default output location (path or fsspec URL).")
    presign_expiry_s: int = Field(
        3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Lifetime of presigned URLs for staged s3/local images (S3 allows 7 days).",
    )

    # --- callbacks ----------------------------------------------------------------------------
    callback_url: str | None = Field(None, description="Public base URL of the receiver.")
    callback_token: SecretStr | None = Field(None, description="Secret path token of the receiver.")
    callback_store: str = Field(
        "./callbacks", description="fsspec URL where the receiver records deliveries."
    )
    callback_check_s: float = Field(
        2.0, gt=0, description="How often a callback-mode run looks for new deliveries."
    )
    callback_backstop_s: float = Field(
        120.0,
        gt=0,
        description="Callback mode: interval of the slow status poll that recovers lost callbacks.",
    )

    # --- what a person sees -------------------------------------------------------------------
    table_every_s: float = Field(
        10.0,
        gt=0,
        description="While a run goes, a new version of its item table artifact this often.",
    )

    # --- the Prefect server --------------------------------------------------------------------
    max_record_lag: int = Field(
        1000,
        ge=10,
        description=(
            "Hold new items while this many of the run's finished task runs are not yet "
            "recorded by the Prefect server (its event queue drops past 10,000 events)."
        ),
    )
    items_per_flow_run: int = Field(
        2000,
        ge=1,
        description=(
            "Larger batches run as child flow runs of at most this many items, so each run's "
            "graph stays under the Prefect UI's 10,000-node limit."
        ),
    )
    part_deployment: str = Field(
        "generate-videos-part/generate-videos-part",
        description=(
            "Deployment of the part flow: a deployed run whose manifest and output are not "
            "local files starts its child runs through it, on the work pool's workers ('' "
            "keeps every part in the run's own process)."
        ),
    )
    part_start_timeout_s: float = Field(
        180.0,
        gt=0,
        description=(
            "A child run no worker has started after this long is cancelled and its part "
            "runs in the parent's process."
        ),
    )

    def retry_policy(self) -> RetryPolicy:
        """The apixo client's bounds on retries of one call."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            max_elapsed_s=self.retry_max_elapsed_s,
            base_s=self.retry_base_s,
            max_s=self.retry_max_s,
        )

    def apixo_client(
        self,
        *,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        **kwargs: Any,
    ) -> ApixoClient:
        """An apixo client with these timeouts, retry bounds and video size limit; the key and
        base URL are `api_key`/`base_url` when given (a credentials block's), else
        APIXO_API_KEY/_BASE_URL.
        `kwargs` go to `ApixoClient` (transports, `retry_rate_limited_submits`, ...)."""
        if base_url is not None:  # a credentials block's: held to the rules of APIXO_BASE_URL
            try:
                base_url = check_http_url(
                    base_url, name="the credentials block's base_url", root=API_ROOT
                )
            except ValueError as exc:
                raise BadSettingError(str(exc)) from None
        key = api_key if api_key is not None else self.apixo_api_key
        if key is None or not key.get_secret_value().strip():
            raise MissingAPIKeyError(
                "no apixo API key: set APIXO_API_KEY or an ApixoCredentials block"
            )
        timeout = httpx.Timeout(
            self.read_timeout_s, connect=self.connect_timeout_s, pool=self.connect_timeout_s
        )
        kwargs.setdefault("max_download_bytes", self.max_video_bytes)
        return ApixoClient(
            key,
            base_url or self.apixo_base_url,
            timeout=timeout,
            retry=self.retry_policy(),
            **kwargs,
        )

    @field_validator("output")
    @classmethod
    def _check_output(cls, v: str) -> str:
        return check_output_url(v, name="HAILUO_OUTPUT")

    @field_validator("callback_store")
    @classmethod
    def _check_callback_store(cls, v: str) -> str:
        return check_output_url(v, name="HAILUO_CALLBACK_STORE")

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return check_http_url(
            v,
            name="HAILUO_CALLBACK_URL",
            root="the receiver's public base URL, such as https://hooks.example.com (the run "
            "adds /callbacks/<token> to it)",
        )

    @field_validator("apixo_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return check_http_url(v, name="APIXO_BASE_URL", root=API_ROOT)

    @field_validator("apixo_api_key", mode="before")
    @classmethod
    def _check_api_key(cls, v: Any) -> Any:
        """An empty key is no key (the CLI then says what to set); a key that could not be sent
        in an HTTP header is refused here, before anything runs. The value is never shown."""
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        if not isinstance(text, str):
            return v
        if not text.strip():
            return None
        if not header_safe(text):
            raise ValueError(
                "APIXO_API_KEY contains white space, control or non-ASCII characters (it is "
                "sent in an HTTP header): check that the whole key, and only it, was pasted"
            )
        return v

    @field_validator("*")
    @classmethod
    def _bounded(cls, v: Any, info: ValidationInfo) -> Any:
        """Durations and prices have an upper bound: a value such as 1e10 s would pass the
        type and the lower bound, then overflow a timer or print `$inf` in the middle of a run."""
        name = info.field_name or ""
        if isinstance(v, int | float) and not isinstance(v, bool):
            var = _variable_name(name)
            if name.endswith("_s") and v > MAX_DURATION_S:
                raise ValueError(f"{var} must be at most {MAX_DURATION_S:,} s (7 days), got {v:g}")
            if name.startswith("price_") and v > MAX_PRICE_USD:
                raise ValueError(f"{var} must be at most {MAX_PRICE_USD:g} USD a clip, got {v:g}")
        return v


_SECRET_VARIABLES = ("APIXO_API_KEY", "HAILUO_CALLBACK_TOKEN")


def check_http_url(value: str, *, name: str, root: str | None = None) -> str:
    """`value` stripped (and without a trailing "/") if it is an http(s) base URL with a host
    that decodes, a port from 1 to 65535 and no query or fragment (paths are added to it);
    else `ValueError` whose message starts with `name`. `root` says what to give instead
    ("the API's root, such as https://api.apixo.ai")."""
    v = value.strip().rstrip("/")
    shown = repr(redact_urls(v)[:80])  # never echo a password typed into the URL
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"{name} {shown} must start with http:// or https://")
    try:
        url = decoded_url(v)
        host, port = url.host, url.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"{name} {shown} does not parse: {redact_urls(str(exc))}") from None
    if not host or any(ch.isspace() for ch in v):
        raise ValueError(f"{name} {shown} must be a URL with a host")
    if url.userinfo:  # httpx would send it as Basic auth, beside (or instead of) the key
        raise ValueError(
            f"{name} {shown} must not carry a user name or password (user:password@): "
            "httpx would send it as Basic auth; give credentials in their own settings or blocks"
        )
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{name} {shown}: the port must be from 1 to 65535")
    if "?" in v or "#" in v:  # paths are added to a base URL: a query would end up in the middle
        raise ValueError(
            f"{name} {shown} must not hold a query (?...) or fragment (#...): give "
            f"{root or 'the base URL alone'}"
        )
    return v


def _variable_name(field_name: str) -> str:
    """The environment variable of a settings field (or the alias it is read from)."""
    if field_name.isupper():
        return field_name  # an alias such as APIXO_BASE_URL
    info = Settings.model_fields.get(field_name)
    alias = getattr(info, "validation_alias", None) if info else None
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    return ENV_PREFIX + field_name.upper()


def settings_error_message(exc: Exception) -> str:
    """One line per broken setting, naming the environment variable; values of secrets hidden."""
    if isinstance(exc, SettingsError):
        found = re.search(r'field "([^"]+)"', str(exc))
        var = _variable_name(found.group(1)) if found else "a setting"
        cause = exc.__cause__
        why = f": {cause}" if cause is not None and var not in _SECRET_VARIABLES else ""
        return f"invalid setting {var}: not valid JSON{why}"
    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            field = loc[0] if loc else "?"
            var = _variable_name(field)
            where = f" (key {'.'.join(loc[1:])})" if len(loc) > 1 else ""
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if msg.startswith(var):  # our validators name the variable and show the value
                lines.append(f"invalid setting {msg}")
                continue
            shown = ""
            if (
                var not in _SECRET_VARIABLES
                and "input" in err
                and not isinstance(err["input"], dict)
            ):
                text = repr(err["input"])
                shown = f" (got {text[:60]}{'...' if len(text) > 60 else ''})"
            lines.append(f"invalid setting {var}{where}: {msg}{shown}")
        return "; ".join(lines) or f"invalid settings: {exc}"
    return f"invalid setting: {exc}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; `BadSettingError` (one clean line per problem) if any is
    malformed: not JSON where JSON is expected, out of range, unknown choice, bad URL."""
    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        raise BadSettingError(settings_error_message(exc)) from None
    except RecursionError:  # JSON nested thousands deep in a HAILUO_* variable
        raise BadSettingError(
            "invalid settings: a JSON value in a HAILUO_* variable is nested too deep"
        ) from None


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """`HAILUO_*` and `APIXO_*` variables that are no setting, each with the nearest setting's
    name if any: a typo (`HAILUO_FETCH_TIMEOUT`, `APIXO_BASE_UR`) would otherwise silently
    leave the default in force (for the base URL: the real, paid API)."""
    environ = os.environ if environ is None else environ
    known = {_variable_name(n) for n in Settings.model_fields} | set(OTHER_VARIABLES)
    out = []
    for name in sorted(environ):
        if name.upper().startswith(VARIABLE_PREFIXES) and name.upper() not in known:
            near = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            out.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()`.

    Raises `BadSettingError` naming the variable when a setting is malformed."""
    return load_settings()
