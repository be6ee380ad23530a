"""Settings and output locations: every malformed value is one clean error naming the variable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from hailuo_batch.settings import (
    BadSettingError,
    Settings,
    check_output_url,
    load_settings,
    output_is_local,
    unknown_variables,
)


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("./output", True),
        ("/srv/videos", True),
        ("out", True),
        ("file:///srv/videos", True),
        ("s3://bucket", False),
        ("s3://bucket/prefix/deeper", False),
        ("  s3://bucket/x  ", False),
    ],
)
def test_accepted_outputs(url: str, local: bool) -> None:
    assert check_output_url(url) == url.strip()
    assert output_is_local(url) is local


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3:/bucket/x", "write s3://bucket/x"),
        ("s3:bucket", "write s3://bucket"),
        ("file:/srv/x", "write file://srv/x"),
        ("gs://bucket/x", "not installed or not known"),
        ("htp://bucket/x", "not installed or not known"),
        ("S3://bucket/x", "lower case"),
        ("memory://x", "not supported"),
        ("webhdfs://host/x", "not supported"),
        ("simplecache::s3://bucket/x", "chained"),
        ("s3://bucket/x::y", "chained"),
        ("s3://", "names no bucket"),
        ("s3:///x", "names no bucket"),
        ("file://", "names no folder"),
        ("", "empty"),
        ("   ", "empty"),
        ("out\x00put", "control character"),
        ("out:1", "write ./out:1"),
        ("C:\\videos", "write ./C:\\videos"),
        ("videos/s3://bucket", "not understood"),
        ("/", "file system's root"),
        ("//", "file system's root"),
        ("/..", "file system's root"),
        ("/tmp/../", "file system's root"),
        ("file:///", "file system's root"),
        ("file://localhost/", "file system's root"),
    ],
)
def test_refused_outputs_say_what_to_write(url: str, says: str) -> None:
    with pytest.raises(BadSettingError) as err:
        check_output_url(url, name="--output")
    assert says in str(err.value)
    assert str(err.value).startswith("--output")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_an_output_is_accepted_only_as_a_plain_path_file_or_s3(text: str) -> None:
    try:
        url = check_output_url(text)
    except BadSettingError:
        return
    assert "::" not in url
    if "://" in url:
        assert url.startswith(("s3://", "file://"))
    else:
        assert ":" not in url.split("/", 1)[0] or url.startswith("/")


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"HAILUO_FAILCODE_POLICY": "not json"}, "HAILUO_FAILCODE_POLICY: not valid JSON"),
        ({"HAILUO_FAILCODE_POLICY": '{"X": "bogus"}'}, "HAILUO_FAILCODE_POLICY (key X)"),
        ({"HAILUO_FAILCODE_POLICY": "[1, 2]"}, "HAILUO_FAILCODE_POLICY"),
        ({"HAILUO_POLL_TIMEOUT_S": "-5"}, "HAILUO_POLL_TIMEOUT_S"),
        ({"HAILUO_FETCH_TIMEOUT_S": "inf"}, "HAILUO_FETCH_TIMEOUT_S"),
        ({"HAILUO_FETCH_TIMEOUT_S": "nan"}, "HAILUO_FETCH_TIMEOUT_S"),
        ({"HAILUO_MAX_IMAGE_BYTES": "9" * 5000}, "HAILUO_MAX_IMAGE_BYTES"),
        # every video would be paid for and refused: not a limit, a mistake
        ({"HAILUO_MAX_VIDEO_BYTES": "10"}, "HAILUO_MAX_VIDEO_BYTES"),
        ({"HAILUO_OUTPUT": "/"}, "HAILUO_OUTPUT '/' is the file system's root"),
        ({"HAILUO_ALLOW_PRIVATE_NETWORKS": "maybe"}, "HAILUO_ALLOW_PRIVATE_NETWORKS"),
        ({"HAILUO_UNCERTAIN_POLICY": "sometimes"}, "HAILUO_UNCERTAIN_POLICY"),
        ({"HAILUO_OUTPUT": "s3:/bucket/x"}, "HAILUO_OUTPUT 's3:/bucket/x'"),
        ({"HAILUO_CALLBACK_STORE": "gs://b/x"}, "HAILUO_CALLBACK_STORE 'gs://b/x'"),
        ({"HAILUO_CALLBACK_URL": "hooks.example.com"}, "HAILUO_CALLBACK_URL"),
        ({"HAILUO_PRESIGN_EXPIRY_S": "99999999"}, "HAILUO_PRESIGN_EXPIRY_S"),
        ({"APIXO_BASE_URL": "ftp://api.example"}, "APIXO_BASE_URL 'ftp://api.example'"),
        ({"APIXO_BASE_URL": "http://[::1"}, "APIXO_BASE_URL 'http://[::1' does not parse"),
        ({"APIXO_BASE_URL": "http://xn--zz"}, "APIXO_BASE_URL 'http://xn--zz' does not parse"),
        ({"APIXO_BASE_URL": "http://a b"}, "APIXO_BASE_URL"),
        ({"APIXO_BASE_URL": "http://127.0.0.1:99999"}, "APIXO_BASE_URL 'http://127.0.0.1:99999'"),
        ({"APIXO_BASE_URL": "http://127.0.0.1:0"}, "the port must be from 1 to 65535"),
        ({"HAILUO_CALLBACK_URL": "http://h:abc"}, "HAILUO_CALLBACK_URL 'http://h:abc'"),
        ({"HAILUO_LEASE_TTL_S": "0.001"}, "HAILUO_LEASE_TTL_S"),
        ({"HAILUO_CALLBACK_URL": "https://h:65536"}, "HAILUO_CALLBACK_URL"),
        ({"HAILUO_CALLBACK_URL": "https://xn--zz--.com"}, "HAILUO_CALLBACK_URL"),
        ({"HAILUO_OUTPUT": "s3://Bad_Bucket!/x"}, "is not a valid S3 bucket name"),
        ({"HAILUO_OUTPUT": "s3://ab/x"}, "is not a valid S3 bucket name"),
        ({"HAILUO_OUTPUT": "s3://a..b/x"}, "is not a valid S3 bucket name"),
        ({"HAILUO_PRICE_PRO_USD": "1e308"}, "HAILUO_PRICE_PRO_USD must be at most"),
        ({"HAILUO_PRICE_STANDARD_6S_USD": "0"}, "HAILUO_PRICE_STANDARD_6S_USD"),
        ({"HAILUO_PRICE_STANDARD_10S_USD": "-0"}, "HAILUO_PRICE_STANDARD_10S_USD"),
        ({"HAILUO_PRICE_PRO_USD": "1e-300"}, "greater than or equal to 0.001"),
        ({"HAILUO_FAILCODE_POLICY": "[" * 5000}, "nested too deep"),
        ({"HAILUO_FAILCODE_POLICY": '{"a":' * 3000}, "HAILUO_"),
    ],
)
def test_malformed_settings_are_one_clean_error_naming_the_variable(
    env: dict[str, str], names: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BadSettingError) as err:
        load_settings()
    message = str(err.value)
    assert names in message
    assert "\n" not in message and "Traceback" not in message
    assert "errors.pydantic.dev" not in message


@pytest.mark.parametrize("field", ["apixo_api_key", "callback_token"])
def test_secret_values_are_never_echoed(field: str) -> None:
    with pytest.raises(BadSettingError) as err:
        load_settings(**{field: ["sk-SECRET-0123456789"]})
    assert "SECRET" not in str(err.value)
    assert ("APIXO_API_KEY" if field == "apixo_api_key" else "HAILUO_CALLBACK_TOKEN") in str(
        err.value
    )


def test_typos_in_variable_names_are_found() -> None:
    env = {
        "HAILUO_FETCH_TIMEOUT": "5",
        "HAILUO_FETCH_TIMEOUT_S": "5",
        "HAILUO_PROJECT_DIR": "/srv",
        "APIXO_API_KEY": "k",
        "PATH": "/bin",
    }
    assert unknown_variables(env) == ["HAILUO_FETCH_TIMEOUT (did you mean HAILUO_FETCH_TIMEOUT_S?)"]


def test_typos_in_apixo_variable_names_are_found_too() -> None:
    """`APIXO_BASE_UR=http://127.0.0.1:8787` was ignored without a word, and the run went to
    the real, paid API."""
    env = {"APIXO_BASE_UR": "http://127.0.0.1:8787", "APIXO_APIKEY": "k", "APIXO_BASE_URL": "x"}
    assert unknown_variables(env) == [
        "APIXO_APIKEY (did you mean APIXO_API_KEY?)",
        "APIXO_BASE_UR (did you mean APIXO_BASE_URL?)",
    ]


DURATIONS = sorted(n for n in Settings.model_fields if n.endswith("_s"))
PRICES = sorted(n for n in Settings.model_fields if n.startswith("price_"))


@pytest.mark.parametrize("field", DURATIONS + PRICES)
@pytest.mark.parametrize("value", ["1e10", "1e300", "9" * 400])
def test_every_duration_and_price_has_an_upper_bound(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value past any timer's range (or a price of $inf) is refused before the run, not met
    as an OverflowError in the middle of it."""
    var = "HAILUO_" + field.upper()
    monkeypatch.setenv(var, value)
    with pytest.raises(BadSettingError) as err:
        load_settings()
    assert var in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "sk-s\u00e9cret-123",
        "sk-\u0441ecret",
        "sk-ab cd",
        "sk-ab\tcd",
        "sk-ab\x00cd",
        "\u200bsk-abc",
    ],
)
def test_an_api_key_that_cannot_be_sent_is_refused_without_showing_it(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It goes in an HTTP header: a pasted key with an accent, a space or a zero-width character
    would fail at the first request with the key in the error (and the run's log)."""
    monkeypatch.setenv("APIXO_API_KEY", key.replace("\x00", ""))  # (no NUL in environ)
    with pytest.raises(BadSettingError) as err:
        load_settings(apixo_api_key=key)
    assert "APIXO_API_KEY" in str(err.value)
    assert "cret" not in str(err.value) and "abc" not in str(err.value)


@pytest.mark.parametrize("variable", ["APIXO_BASE_URL", "HAILUO_CALLBACK_URL"])
@pytest.mark.parametrize(
    "url",
    [
        "http://bob:hunter2pw@127.0.0.1:8901",
        "https://hunter2pw@api.example",
        "https://bob:hunter2pw@api.example:99999",
        "http://bob:hunter2pw@[::1",
    ],
)
def test_a_url_with_a_password_is_refused_without_echoing_it(
    variable: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx would send `user:password@` as Basic auth in place of the key (a run then fails
    with a misleading 401); the message names the variable and never shows the password."""
    monkeypatch.setenv(variable, url)
    with pytest.raises(BadSettingError) as err:
        load_settings()
    assert variable in str(err.value) and "hunter2pw" not in str(err.value)
    monkeypatch.delenv(variable)
    with pytest.raises(BadSettingError, match="base_url") as err:  # a credentials block's
        load_settings().apixo_client(api_key=SecretStr("k"), base_url=url)
    assert "hunter2pw" not in str(err.value)


@pytest.mark.parametrize("key", ["", " ", "\t \n"])
def test_an_empty_api_key_is_no_key(key: str) -> None:
    assert load_settings(apixo_api_key=key).apixo_api_key is None


@pytest.mark.parametrize(
    "base_url", ["http://xn--zz--.com", "https://api.example:99999", "ftp://api.example", "http://"]
)
def test_a_credentials_blocks_base_url_is_held_to_the_same_rules(base_url: str) -> None:
    """A block's base_url reaches the client without passing APIXO_BASE_URL's check: a URL
    that cannot be built must stop the run as a bad setting, not be POSTed to (and, failing
    there, leave the item reported as a possible charge)."""
    with pytest.raises(BadSettingError, match="base_url"):
        load_settings().apixo_client(api_key=SecretStr("k"), base_url=base_url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:18787?x=1", "https://api.apixo.ai/?", "https://api.apixo.ai#v1"]
)
def test_a_base_url_with_a_query_or_fragment_is_a_bad_setting(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`APIXO_BASE_URL=http://127.0.0.1:18787?x=1` was accepted and the run ended
    ApiEndpointNotFound (exit 1): the API's paths went after the query."""
    monkeypatch.setenv("APIXO_BASE_URL", url)
    with pytest.raises(BadSettingError) as err:
        load_settings()
    assert str(err.value).startswith("invalid setting APIXO_BASE_URL")
    assert "query (?...) or fragment (#...)" in str(err.value)
    assert "the API's root, such as https://api.apixo.ai" in str(err.value)
    monkeypatch.delenv("APIXO_BASE_URL")
    with pytest.raises(BadSettingError, match="the API's root"):  # a credentials block's
        load_settings().apixo_client(api_key=SecretStr("k"), base_url=url)
    monkeypatch.setenv("HAILUO_CALLBACK_URL", url)
    with pytest.raises(BadSettingError, match=r"HAILUO_CALLBACK_URL.*receiver's public base URL"):
        load_settings()
