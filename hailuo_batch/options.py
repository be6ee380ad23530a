"""The batch options, declared once: the flows' `options` parameter, the CLI's flags, the UI form.

`generate-videos` and `nightly-batch` take a `BatchOptions`; `rerun-failed` takes the
`RunOptions` part (its rows keep their own mode, duration and provider unless it overrides
them). `hailuo-batch run` builds its flags from these fields (`hailuo_batch.cli`), and the
Prefect UI's run form shows them, with their choices, defaults and descriptions, as one group.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hailuo_batch.apixo import Mode, Provider, RequestType
from hailuo_batch.manifest import MODE_ALIASES, ItemDefaults


class RunOptions(BaseModel):
    """How a run submits and stores: output, concurrency, money guards, blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str | None = Field(
        None,
        description="Output location: a local folder, file:///path or s3://bucket/prefix "
        "(default: the storage block's URL, else HAILUO_OUTPUT; a rerun: its results' output).",
    )
    concurrency: int = Field(
        10,
        ge=1,
        le=500,
        strict=True,  # `true` is not a number of items (lax pydantic made it 1)
        description="Most items in flight at the provider at once, 1 to 500 (the run finds the "
        "provider's real limit below it).",
    )
    request_type: RequestType = Field(
        RequestType.ASYNC,
        description="async: poll every task. callback: the provider POSTs results to "
        "`hailuo-batch receiver` (HAILUO_CALLBACK_URL, _TOKEN, _STORE); a slow poll recovers "
        "lost callbacks.",
    )
    dry_run: bool = Field(False, description="Validate and estimate the cost; submit nothing.")
    max_cost_usd: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        strict=True,  # `true` from a form's JSON is not a cap of $1.00
        description="Stop submitting once this run's estimated spend (USD) would pass it.",
    )
    fit_to_balance: bool = Field(
        False,
        description="If the batch costs more than the balance, submit what fits (else fail "
        "before spending).",
    )
    max_failure_share: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="End the run Failed when more than this share (0 to 1) of the items did not "
        "succeed (default: only when none succeeded).",
    )
    credentials_block: str | None = Field(
        None, description="Name of an ApixoCredentials block (else APIXO_API_KEY)."
    )
    storage_block: str | None = Field(
        None,
        description="Name of an OutputStorage block: its URL is the default output and its S3 "
        "options reach the manifest, images and output.",
    )


class BatchOptions(RunOptions):
    """Run options plus the values for rows that leave mode, duration or provider empty."""

    mode: Mode = Field(
        Mode.STANDARD,
        description="Mode for rows without one: standard (768p, 6 or 10 s) or pro (1080p, 6 s).",
    )
    duration: Literal[6, 10] = Field(
        6, description="Clip length in seconds for standard rows without one."
    )
    provider: Provider = Field(Provider.AUTO, description="Provider routing for rows without one.")

    @field_validator("mode", mode="before")
    @classmethod
    def _short_mode(cls, v: Any) -> Any:
        """`standard` and `pro` are accepted, as in a manifest's mode column."""
        return MODE_ALIASES.get(v, v) if isinstance(v, str) else v

    def item_defaults(self) -> ItemDefaults:
        return ItemDefaults(mode=self.mode, duration=self.duration, provider=self.provider)


def split_options(
    model: type[RunOptions], params: dict[str, Any]
) -> tuple[RunOptions | None, dict[str, Any]]:
    """Fold flat keyword arguments that are fields of `model` into one `model` (None if there
    were none); the rest are returned as they are. For callers that like flat keywords."""
    mine = {k: params[k] for k in params if k in model.model_fields}
    rest = {k: v for k, v in params.items() if k not in mine}
    return (model(**mine) if mine else None), rest


def flow_parameters(flow_fn: Any, **params: Any) -> dict[str, Any]:
    """`params` for `flow_fn` (a flow or a function), with flat batch options (`output=`,
    `concurrency=`, ...) folded into its `options` parameter: callers may pass them either way."""
    model = typing.get_type_hints(getattr(flow_fn, "fn", flow_fn)).get("options")
    if not (isinstance(model, type) and issubclass(model, RunOptions)):
        return params
    given, rest = split_options(model, params)
    if given is not None:
        if "options" in rest:
            raise TypeError("pass the batch options either flat or as options=, not both")
        rest["options"] = given
    return rest
