"""The batch options are declared once: flows, CLI and the UI form all read the same fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.batch import flow_parameters, generate_videos
from flows.nightly import nightly_batch
from flows.rerun import rerun_failed
from hailuo_batch.apixo import Mode
from hailuo_batch.options import BatchOptions, RunOptions, split_options


def test_defaults_and_short_mode_names():
    o = BatchOptions()
    assert (o.mode, o.duration, o.concurrency, o.request_type) == (Mode.STANDARD, 6, 10, "async")
    assert BatchOptions(mode="pro").mode == Mode.PRO
    assert BatchOptions(mode="pro-image-to-video").item_defaults().mode == Mode.PRO


@pytest.mark.parametrize(
    "bad",
    [{"concurrency": 0}, {"duration": 7}, {"max_cost_usd": -1}, {"max_failure_share": 2},
     {"mode": "ultra"}, {"max_cost_usd": float("nan")}, {"unknown": 1}, {"concurrency": True},
     {"concurrency": 2.5}, {"max_failure_share": float("nan")}, {"max_cost_usd": True},
     {"max_cost_usd": "2"}],
)  # fmt: skip
def test_bad_options_are_refused(bad):
    with pytest.raises(ValidationError):
        BatchOptions(**bad)


def test_every_option_is_described_for_the_ui_form():
    for flow_fn, model in ((generate_videos, "BatchOptions"), (rerun_failed, "RunOptions")):
        schema = flow_fn.parameters.model_dump()
        assert schema["properties"]["options"]["$ref"] == f"#/definitions/{model}"
        assert schema["properties"]["options"].get("description")
        fields = schema["definitions"][model]["properties"]
        assert all(spec.get("description") for spec in fields.values()), fields
        assert "default" in fields["concurrency"] and fields["concurrency"]["maximum"] == 500
    assert set(nightly_batch.parameters.properties) == {"inbox", "options"}


def test_flat_options_fold_into_the_options_parameter():
    params = flow_parameters(generate_videos, manifest="m.csv", concurrency=4, force=True)
    assert params == {"manifest": "m.csv", "force": True, "options": BatchOptions(concurrency=4)}
    rerun = flow_parameters(rerun_failed, results="r", mode=Mode.PRO, output="o")
    assert rerun == {"results": "r", "mode": Mode.PRO, "options": RunOptions(output="o")}
    assert flow_parameters(generate_videos, manifest="m") == {"manifest": "m"}
    with pytest.raises(TypeError):
        flow_parameters(generate_videos, manifest="m", options=BatchOptions(), dry_run=True)
    assert split_options(RunOptions, {"x": 1}) == (None, {"x": 1})


def run_with(manifest: str, options: RunOptions = RunOptions()) -> None:
    """A plain function taking options, as a flow does."""


def test_flat_options_fold_for_plain_functions_too():
    from hailuo_batch.options import flow_parameters as fold

    assert fold(run_with, manifest="m", dry_run=True) == {
        "manifest": "m",
        "options": RunOptions(dry_run=True),
    }
    assert fold(print, sep="-") == {"sep": "-"}  # nothing to fold into
