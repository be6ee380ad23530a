"""The Prefect server settings every server of the project runs with (hailuo_batch.orchestrator)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import prefect.settings
import pytest
import yaml

from hailuo_batch import cli
from hailuo_batch.orchestrator import RECORDING_SETTINGS, recording_advice, server_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def environ() -> Iterator[os._Environ[str]]:
    """os.environ, put back as it was after the test (the CLI writes to it), without the
    recording settings."""
    saved = dict(os.environ)
    for name in RECORDING_SETTINGS:
        os.environ.pop(name, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_each_setting_is_one_prefect_reads_and_changes_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a misspelt name would be ignored by Prefect without a word: read each one back
    for name, value in server_env({}).items():
        monkeypatch.setenv(name, value)
    settings = prefect.settings.Settings()
    for name, value in RECORDING_SETTINGS.items():
        setting = getattr(prefect.settings, name)
        assert setting.value_from(settings) == type(setting.default())(value), name
        assert setting.value_from(settings) != setting.default(), name


def test_a_value_already_in_the_environment_wins() -> None:
    name = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"
    env = server_env({name: "7", "PREFECT_OTHER": "x"})
    assert env[name] == "7"
    assert set(env) == set(RECORDING_SETTINGS)
    assert all(env[k] == v for k, v in RECORDING_SETTINGS.items() if k != name)


def test_the_compose_file_s_server_runs_with_the_same_settings() -> None:
    compose = yaml.safe_load((REPO / "deployments" / "docker-compose.yaml").read_text())
    environment = compose["services"]["server"]["environment"]
    assert {k: environment.get(k) for k in RECORDING_SETTINGS} == RECORDING_SETTINGS


def test_the_cli_s_temporary_server_inherits_them(
    environ: os._Environ[str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE"
    environ[name] = "50"  # the user's own
    environ.pop("PREFECT_API_URL", None)
    with prefect.settings.temporary_settings(restore_defaults={prefect.settings.PREFECT_API_URL}):
        cli._prepare_prefect(quiet=False)
    assert {k: environ[k] for k in RECORDING_SETTINGS} == {**RECORDING_SETTINGS, name: "50"}
    assert "temporary Prefect server" in capsys.readouterr().err


def test_a_configured_server_is_left_alone(environ: os._Environ[str]) -> None:
    with prefect.settings.temporary_settings({prefect.settings.PREFECT_API_URL: "http://x/api"}):
        cli._prepare_prefect(quiet=False)
    assert not set(RECORDING_SETTINGS) & set(environ)


def _served(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """What a server started with `env` answers to `GET /admin/settings` (its settings, as
    JSON)."""
    for name in RECORDING_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return prefect.settings.Settings().model_dump(mode="json")


def test_a_server_on_prefect_s_recorder_defaults_gets_advice_naming_every_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    advice = recording_advice(_served({}, monkeypatch))
    assert advice is not None
    assert "one event per database write" in advice
    assert all(f"{name}={value}" in advice for name, value in RECORDING_SETTINGS.items())


@pytest.mark.parametrize("batch_size", ["200", "20", "2"])
def test_a_server_whose_recorder_batches_gets_none(
    batch_size: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": batch_size}
    assert recording_advice(_served(env, monkeypatch)) is None
    assert recording_advice(_served(server_env({}), monkeypatch)) is None


@pytest.mark.parametrize(
    "answer",
    [{}, {"server": None}, {"server": {"services": {}}}, {"detail": "Not Found"}, []],
)
def test_a_server_that_does_not_say_gets_none(answer: object) -> None:
    assert recording_advice(answer) is None  # type: ignore[arg-type]
