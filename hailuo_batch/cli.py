"""`hailuo-batch`: run batches, validate manifests, and start the local apixo emulator.

Exit codes:
  0  success: `validate` found every row valid; `run`/`rerun` completed (even with some items
     skipped, failed or invalid: the results file says which)
  1  `validate` found invalid rows or could not use the manifest; a run failed (its flow run
     ended Failed or Crashed, e.g. an unreadable manifest or an unreachable API)
  2  bad usage or a bad setting (option, HAILUO_* / APIXO_* variable, --output, a malformed or
     unreachable PREFECT_API_URL): reported in one line before anything is paid
  130  interrupted (Ctrl-C)
  143  stopped by SIGTERM (a scheduler, `kill`, a container stopping)
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import signal
import sys
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

EPILOG = """\
environment:
  APIXO_API_KEY            apixo API key (required for run)
  APIXO_BASE_URL           API base URL (default https://api.apixo.ai)
  HAILUO_POLL_INITIAL_S / HAILUO_POLL_INTERVAL_S / HAILUO_POLL_TIMEOUT_S   polling schedule
  HAILUO_ALLOW_PRIVATE_NETWORKS=1   allow image URLs on private/loopback addresses
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   any S3-compatible store
  see README.md for every setting.

examples:
  hailuo-batch emulator --time-scale 0.01 --api-key demo
  hailuo-batch validate manifest.csv
  hailuo-batch run manifest.csv --output s3://my-bucket/videos --concurrency 20

exit codes: 0 success, 1 invalid rows (validate) or a failed run, 2 bad usage or setting,
  130 interrupted (Ctrl-C), 143 stopped (SIGTERM): run the same command again to resume
"""


RECEIVER_EPILOG = """\
settings (environment):
  HAILUO_CALLBACK_TOKEN   required: the secret path token, at least 16 URL-safe characters;
                          generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))'
                          anyone who knows it can post results: keep it out of logs and tickets
  HAILUO_CALLBACK_STORE   where deliveries are recorded (default ./callbacks; s3://bucket/prefix
                          when the receiver and the flow run on different machines)
  HAILUO_CALLBACK_URL     the receiver's public https base URL; the flow sends the provider
                          HAILUO_CALLBACK_URL/callbacks/HAILUO_CALLBACK_TOKEN

public HTTPS:
  The receiver speaks plain HTTP on 127.0.0.1 by default. Put a TLS reverse proxy or a tunnel
  in front of it and set HAILUO_CALLBACK_URL to the public address, e.g.
    Caddy:   hooks.example.com { reverse_proxy 127.0.0.1:8788 }
    nginx:   location /callbacks/ { proxy_pass http://127.0.0.1:8788; access_log off; }
    tunnel:  cloudflared tunnel --url http://127.0.0.1:8788
  The proxy's access log prints the path, hence the token: turn it off or redact it.
  The receiver's own log never prints it (one JSON line per request, path redacted).
"""


#: flag spellings that differ from `--field-name`
FLAGS = {"output": ("--output", "-o"), "max_cost_usd": ("--max-cost", "--max-cost-usd")}
ROW_DEFAULTS = ("mode", "duration", "provider")


def add_options(
    p: argparse.ArgumentParser, model: Any, *, only: tuple[str, ...] | None = None
) -> None:
    """One flag per field of the options `model` (`hailuo_batch.options`): its type, choices,
    bounds and help come from the field. Flags left out stay None and the model's default
    applies (`options_from`)."""
    for name, info in model.model_fields.items():
        if only is not None and name not in only:
            continue
        flags = FLAGS.get(name, (f"--{name.replace('_', '-')}",))
        kw: dict[str, Any] = {"dest": name, "default": None, "help": _help(info)}
        if name in _METAVARS:
            kw["metavar"] = _METAVARS[name]
        kind = _scalar_type(info.annotation)
        if kind is bool:
            kw.update(action="store_true", default=False)
            kw.pop("metavar", None)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            kw["choices"] = _aliases().get(name, [e.value for e in kind])
        elif isinstance(kind, tuple):  # a Literal
            kw.update(type=type(kind[0]), choices=list(kind))
        elif kind in (int, float):
            kw.update(type=_checker(name, kind, info), metavar=_METAVARS.get(name, "N"))
        p.add_argument(*flags, **kw)


def options_from(args: argparse.Namespace, model: Any) -> Any:
    """The options `model` from the flags given (the model's defaults for the others)."""
    given = {n: getattr(args, n) for n in model.model_fields if hasattr(args, n)}
    return model(**{n: v for n, v in given.items() if v is not None})


def _aliases() -> dict[str, list[str]]:
    from hailuo_batch.manifest import MODE_ALIASES

    return {"mode": list(MODE_ALIASES)}


_METAVARS = {
    "max_cost_usd": "USD",
    "max_failure_share": "0..1",
    "output": "URL",
    "credentials_block": "NAME",
    "storage_block": "NAME",
    "mode": "{standard,pro}",
}


def _help(info: Any) -> str:
    text = str(info.description or "").rstrip(".")
    default = info.default
    if default not in (None, False):
        text += f" (default: {getattr(default, 'value', default)})"
    return text.replace("%", "%%")


def _scalar_type(annotation: Any) -> Any:
    """bool, int, float, str, an Enum class, or a Literal's values (as a tuple); None dropped."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _scalar_type(args[0]) if args else annotation


def _finite(text: str) -> float:
    """argparse `type=` for a finite number (no nan, inf or 1e309)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _port(text: str) -> int:
    """argparse `type=` for a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 0 to 65535")
    return value


def _checker(name: str, kind: type, info: Any) -> Any:
    """argparse `type=` for a bounded number: a clean 'is not ...' message (exit 2)."""
    lo = next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), None)
    hi = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
    if kind is int:
        what = f"a whole number from {lo} to {hi}"
    elif (lo, hi) == (0, 1):
        what = "a share from 0 to 1 (e.g. 0.2)"
    elif name.endswith("_usd"):
        what = f"an amount of USD ({lo:g} or more, e.g. 25)"
    else:
        what = f"a number ({lo:g} or more)"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and value == value and abs(value) != float("inf")
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from hailuo_batch.options import BatchOptions, RunOptions
    from hailuo_batch.results import ItemStatus

    parser = _Parser(
        prog="hailuo-batch",
        description="Turn a manifest of images and prompts into videos with apixo hailuo-2-3-fast.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run",
        help="run a batch: validate, submit, poll, store, report",
        description="Run the generate-videos flow on MANIFEST and store the videos under --output.",
    )
    p.add_argument("manifest", help="CSV, JSONL or JSON manifest: a path or fsspec URL (s3://...)")
    add_options(p, BatchOptions)
    p.add_argument(
        "--quiet", "-q", action="store_true", help="print only the final summary (and errors)"
    )

    r = sub.add_parser(
        "rerun",
        help="rerun the failed items of a previous run",
        description="Run again the items of RESULTS_URL that match the filters, into the same "
        "output. Default statuses: failed, not_submitted, uncertain. Skipped content violations "
        "are rerun only with --status skipped.",
    )
    r.add_argument("results", metavar="RESULTS_URL", help="{output}/runs/{run_id}/results.jsonl")
    r.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in ItemStatus],
        help="status to rerun (repeatable; default: failed, not_submitted, uncertain)",
    )
    r.add_argument(
        "--fail-code",
        action="append",
        help="only this failCode (repeatable); naming a bad-input code reruns such items unchanged",
    )
    r.add_argument("--id", action="append", dest="ids", help="only this item id (repeatable)")
    r.add_argument(
        "--mode", choices=_aliases()["mode"], metavar="{standard,pro}", help="override the mode"
    )
    r.add_argument("--duration", type=int, choices=[6, 10], help="override the duration")
    r.add_argument("--provider", choices=["auto", "value", "official"], help="override provider")
    r.add_argument("--prompt-suffix", help="text appended to every prompt")
    r.add_argument(
        "--resubmit-lost",
        action="store_true",
        help="pay for a new task for items whose task the provider lost (TASK_NOT_FOUND, "
        "POLL_TIMEOUT); reported as possible duplicate charges (default: read them again)",
    )
    add_options(r, RunOptions)
    r.add_argument(
        "--quiet", "-q", action="store_true", help="print only the final summary (and errors)"
    )

    v = sub.add_parser(
        "validate",
        help="check a manifest and its images; submit nothing",
        description="Print every problem of MANIFEST and the cost estimate. Exit 1 on any bad row.",
    )
    v.add_argument("manifest", help="CSV, JSONL or JSON manifest: a path or fsspec URL")
    v.add_argument(
        "--output",
        "-o",
        default=None,
        help="the output the run will use (default: HAILUO_OUTPUT or ./output); local image "
        "paths need an s3:// output",
    )
    add_options(v, BatchOptions, only=ROW_DEFAULTS)
    v.add_argument("--json", action="store_true", help="print a JSON report instead of text")

    e = sub.add_parser(
        "emulator",
        help="start the local apixo emulator (for demos, tests, benchmarks)",
        description="Serve the apixo hailuo-2-3-fast API contract locally.",
    )
    e.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    e.add_argument("--port", type=_port, default=8787, help="port (default: 8787, 0: any free)")
    e.add_argument("--api-key", default=None, help="accept only this key (default: any non-empty)")
    e.add_argument(
        "--time-scale",
        type=_finite,
        default=1.0,
        help="multiply provider-side times: 0.01 makes a 120 s generation take 1.2 s",
    )
    e.add_argument("--concurrency", type=int, default=20, help="tasks in flight per key before 429")
    e.add_argument(
        "--fault-rate", type=_finite, default=0.0, help="probability of an injected fault per call"
    )
    e.add_argument(
        "--hostile",
        action="store_true",
        help="random faults include malformed status answers and non-video downloads",
    )
    e.add_argument("--seed", type=int, default=None, help="random seed for faults and timings")
    e.add_argument("--balance", type=_finite, default=1000.0, help="starting balance in USD")
    e.add_argument("--fps", type=int, default=24, help="frame rate of generated videos")
    e.add_argument("--files-dir", default=None, help="serve this folder under /files/")

    rcv = sub.add_parser(
        "receiver",
        help="start the callback (webhook) receiver for request_type callback",
        description=(
            "Receive the provider's completion callbacks at POST /callbacks/<token> and record "
            "each one, once per taskId, in HAILUO_CALLBACK_STORE, where the flow reads them. "
            "GET /healthz answers 200."
        ),
        epilog=RECEIVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rcv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    rcv.add_argument("--port", type=_port, default=8788, help="port (default: 8788)")
    rcv.add_argument(
        "--emit-events",
        action="store_true",
        help="emit a Prefect event per completed task (hailuo-batch.task.success/failed)",
    )
    return parser


def _defaults(args: argparse.Namespace) -> Any:
    from hailuo_batch.options import BatchOptions

    return options_from(args, BatchOptions).item_defaults()


def cmd_validate(args: argparse.Namespace) -> int:
    from hailuo_batch.manifest import ManifestError, load_manifest
    from hailuo_batch.policy import Prices, estimate_cost
    from hailuo_batch.secrets import redact_urls
    from hailuo_batch.settings import check_output_url, get_settings, output_is_local
    from hailuo_batch.validation import preflight

    settings = get_settings()
    shown = redact_urls(args.manifest)  # a presigned link's password and signature
    if args.output is not None:
        output = check_output_url(args.output, name="--output")
    else:
        output = check_output_url(settings.output, name="HAILUO_OUTPUT")
    local_output = output_is_local(output)
    try:
        manifest = load_manifest(args.manifest, _defaults(args))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:  # a script reading stdout gets the same verdict as JSON
            print(json.dumps({"manifest": shown, "error": str(exc)}, indent=2))
        return 1
    with ThreadPoolExecutor(max_workers=8) as pool:
        checks = list(
            pool.map(
                lambda i: preflight(i, settings=settings, output_is_local=local_output),
                manifest.items,
            )
        )
    problems: list[tuple[int, str | None, str | None, str]] = [
        (e.row, e.id, e.field, e.reason) for e in manifest.errors
    ]
    problems += [(c.item.row, c.item.id, c.field, "; ".join(c.errors)) for c in checks if not c.ok]
    problems.sort(key=lambda p: p[0])
    invalid_rows = len({p[0] for p in problems})  # a row may break several rules
    valid = [c.item for c in checks if c.ok]
    prices = Prices.from_settings(settings)
    cost = sum(estimate_cost(str(i.mode), i.duration, prices) for i in valid)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": shown,
                    "rows": manifest.total_rows,
                    "valid": len(valid),
                    "invalid": invalid_rows,
                    "estimated_cost_usd": round(cost, 4),
                    "problems": [
                        {"row": r, "id": i, "field": f, "reason": m} for r, i, f, m in problems
                    ],
                },
                indent=2,
            )
        )
    else:
        for row, item_id, fld, reason in problems:
            print(f"row {row} (id {item_id or '-'}), field '{fld}': {reason}")
        print(f"{shown}: {manifest.total_rows} rows, {len(valid)} valid, {invalid_rows} invalid")
        print(
            f"estimated cost of the valid items: ${cost:,.2f} (prices: standard 6 s "
            f"${prices.standard_6s}, 10 s ${prices.standard_10s}, pro ${prices.pro}; "
            "set HAILUO_PRICE_* to change)"
        )
    return 1 if problems else 0


def _run_with_progress(flow_fn: Any, quiet: bool, **params: Any) -> int:
    """Run a flow in this process with a progress bar; print the outcome; exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.batch import run_flow_sync
    from flows.run import NOT_STARTED
    from hailuo_batch import progress as prog

    bar = Progress(
        TextColumn("[bold]items"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=quiet or not sys.stderr.isatty(),
    )
    bar_task = bar.add_task("", total=None)

    started: list[bool] = []  # progress was reported: the run got past its start

    def on_progress(state: prog.ProgressState) -> None:
        started[:] = [True]
        counts = " ".join(f"{k}={v}" for k, v in sorted(state.by_status.items()))
        bar.update(bar_task, total=state.total, completed=state.done, description=counts)

    prog.add_listener(on_progress)
    try:
        with bar:
            state = run_flow_sync(flow_fn, **params)
    except RuntimeError as exc:
        if (url := _unreached_prefect_api(exc)) is None:
            raise
        if started:  # not seen in practice: Prefect checks the API once, before the run starts
            print(f"error: the Prefect API at {url} stopped answering during the run: "
                  f"once it is back, {_RESUME.split('; ', 1)[1]}", file=sys.stderr)  # fmt: skip
            return 1
        print(
            f"error: the Prefect API at {url} did not answer, so the run did not start and "
            "nothing was submitted: start it (`prefect server start`), check PREFECT_API_URL, "
            "or unset PREFECT_API_URL to run on a temporary server",
            file=sys.stderr,
        )
        return 2
    finally:
        prog.remove_listener(on_progress)
    summary = _summary_of(state)
    if summary and "by_status" in summary:
        print(f"run id:   {summary['run_id']}")
        counts = Counter({k: v for k, v in summary["by_status"].items() if v})
        print("items:    " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"results:  {summary.get('results')}")
        print(f"videos:   {str(summary.get('output', '')).rstrip('/')}/videos/")
        if summary.get("review_page"):
            print(f"review:   {summary['review_page']}")
        if summary.get("dry_run"):
            print(f"would cost: ${summary.get('estimated_batch_cost_usd', 0.0):,.2f} (a dry run: "
                  "nothing was submitted)")  # fmt: skip
        else:
            print(f"estimated cost: ${summary['estimated_cost_usd']:,.2f} (this run)")
        if twice := summary.get("possible_duplicate_charges"):
            print(f"check:    {twice} items may have been paid for twice (uncertain in the "
                  "results): see the provider's dashboard")  # fmt: skip
        problems = summary.get("problems") or []
        for p in problems:
            print(f"  {p['status']:<13} row {p['row']} ({p['id']}): {p['reason']}")
        more = summary.get("problems_total", len(problems)) - len(problems)
        if more > 0:
            kinds = ", ".join(f"{n} {k}" for k, n in (summary.get("problems_more") or {}).items())
            print(f"  ... and {more} more{f' ({kinds})' if kinds else ''}: see the results file")
    elif summary and summary.get("selected") == 0:  # a rerun that found nothing to do
        print("nothing to rerun: no item of the results file matches the filters")
        for why in summary.get("left_out") or []:
            print(f"  not rerun: {why}")
    link = _ui_link(state)
    if link:
        print(f"Prefect:  {link}")
    if state.is_completed():
        if state.message:
            print(f"note:     {state.message}")
        return 0
    if state.name == NOT_STARTED:  # a block, key or store that fails: a bad setting
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    print(f"run failed: {state.message}", file=sys.stderr)
    return 1


def _unreached_prefect_api(exc: RuntimeError) -> str | None:
    """The API URL when `exc` is Prefect's "Failed to reach API at URL" (its client checks the
    server's version when it first connects, before a flow run starts), else None."""
    said = str(exc)
    prefix = "Failed to reach API at "
    return said.removeprefix(prefix).rstrip(".") if said.startswith(prefix) else None


def _ui_link(state: Any) -> str | None:
    """The flow run's page in the Prefect UI, when a UI is configured."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    run_id = getattr(getattr(state, "state_details", None), "flow_run_id", None)
    if not ui or run_id is None:
        return None
    return f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}"


def _check_output(
    output: str | None, storage_block: str | None, *, has_default: bool = False
) -> str | None:
    """The --output given (checked), or the default when no storage block names one
    (`has_default`: the command has its own, a rerun its results' output).

    A bad output is a bad setting: `BadSettingError` (exit 2) before the manifest is read.
    """
    from hailuo_batch.settings import check_block_name, check_output_url, get_settings

    check_block_name(storage_block, name="--storage-block")
    if output is not None:
        return check_output_url(output, name="--output")
    if not storage_block and not has_default:
        check_output_url(get_settings().output, name="HAILUO_OUTPUT")
    return None


def _missing_api_key(credentials_block: str | None) -> bool:
    """True (and says so) when neither APIXO_API_KEY nor a credentials block gives a key."""
    from hailuo_batch.settings import check_block_name, get_settings

    if check_block_name(credentials_block, name="--credentials-block") or (
        get_settings().apixo_api_key is not None
    ):
        return False
    print(
        "error: no apixo API key: set APIXO_API_KEY, or pass --credentials-block NAME "
        "(an ApixoCredentials block; see README)",
        file=sys.stderr,
    )
    return True


TEMPORARY_SERVER_NOTE = (
    "note: no PREFECT_API_URL is set: this run uses a temporary Prefect server and will not be "
    "visible in a Prefect UI (to see it: `prefect server start`, then "
    "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)"
)


def _prepare_prefect(quiet: bool) -> None:
    """Settle Prefect's process settings; call before `prefect` is first imported.

    `quiet`: Prefect logs only warnings and errors, so the final summary is all that is printed.
    Output that is not a terminal gets Prefect's log lines uncoloured (no highlighting work).
    No API URL configured: say in one line that a temporary server is used, give that server
    the settings that record task runs in batches (`orchestrator.server_env`), and keep it and
    this process from sending usage data (`DO_NOT_TRACK`, server analytics off).
    """
    if quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_StopNoise())
    if sys.stderr is None or not sys.stderr.isatty():  # no colours: no highlighting to pay for
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
    from prefect.settings import get_current_settings

    if api := get_current_settings().api.url:
        if not str(api).startswith(("http://", "https://")):
            from hailuo_batch.secrets import redact_urls
            from hailuo_batch.settings import BadSettingError

            raise BadSettingError(
                f"PREFECT_API_URL {redact_urls(str(api))[:80]!r} is not an http(s) URL: give a "
                "Prefect server's API, such as http://127.0.0.1:4200/api, or unset "
                "PREFECT_API_URL to run on a temporary server"
            )
        return
    from hailuo_batch.orchestrator import server_env

    os.environ.update(server_env(os.environ))  # the temporary server inherits them
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    print(TEMPORARY_SERVER_NOTE, file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from hailuo_batch.options import BatchOptions

    options = options_from(args, BatchOptions)
    output = _check_output(options.output, options.storage_block)
    if _missing_api_key(options.credentials_block):
        return 2
    _prepare_prefect(args.quiet)

    from flows.batch import generate_videos

    return _run_with_progress(
        generate_videos,
        args.quiet,
        manifest=args.manifest,
        options=options.model_copy(update={"output": output}),
    )


def cmd_rerun(args: argparse.Namespace) -> int:
    from hailuo_batch.options import RunOptions

    options = options_from(args, RunOptions)
    output = _check_output(options.output, options.storage_block, has_default=True)
    if args.prompt_suffix is not None:  # appended to every prompt: held to a cell's rules
        from hailuo_batch.manifest import text_problem

        if problem := text_problem(args.prompt_suffix, allow_newlines=True):
            print(f"error: --prompt-suffix {problem}", file=sys.stderr)
            return 2
    if _missing_api_key(options.credentials_block):
        return 2
    _prepare_prefect(args.quiet)

    from flows.rerun import rerun_failed
    from hailuo_batch.manifest import MODE_ALIASES
    from hailuo_batch.rerun import DEFAULT_RERUN_STATUSES

    return _run_with_progress(
        rerun_failed,
        args.quiet,
        results=args.results,
        statuses=args.status or [s.value for s in DEFAULT_RERUN_STATUSES],
        fail_codes=args.fail_code,
        ids=args.ids,
        mode=None if args.mode is None else MODE_ALIASES[args.mode],
        duration=args.duration,
        provider=args.provider,
        prompt_suffix=args.prompt_suffix,
        resubmit_lost=args.resubmit_lost,
        options=options.model_copy(update={"output": output}),
    )


def _summary_of(state: Any) -> dict[str, Any] | None:
    try:
        data = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a failed run may carry no data; reported by the caller
        return None
    return data if isinstance(data, dict) else None


def cmd_emulator(args: argparse.Namespace) -> int:
    try:
        from hailuo_batch.emulator import EmulatorConfig, serve
    except ModuleNotFoundError as exc:  # numpy comes with the `emulator` extra only
        print(
            f"error: the emulator needs {exc.name}: install hailuo-batch[emulator] "
            "(`make install` does)",
            file=sys.stderr,
        )
        return 2

    flags = {
        "host": "--host", "port": "--port", "api_key": "--api-key", "time_scale": "--time-scale",
        "concurrency": "--concurrency", "fault_rate": "--fault-rate", "hostile_faults": "--hostile",
        "seed": "--seed", "balance_usd": "--balance", "fps": "--fps", "files_dir": "--files-dir",
    }  # fmt: skip
    if args.files_dir is not None and not os.path.exists(args.files_dir):
        print(f"error: --files-dir: {args.files_dir!r} does not exist", file=sys.stderr)
        return 2
    try:
        config = EmulatorConfig(**{field: getattr(args, flag[2:].replace("-", "_"))
                                   for field, flag in flags.items()})  # fmt: skip
    except ValidationError as exc:
        for err in exc.errors():
            flag = flags.get(str(err["loc"][0]) if err.get("loc") else "", "a flag")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            print(f"error: {flag}: {msg}", file=sys.stderr)
        return 2
    try:
        serve(config)
    except (OSError, OverflowError) as exc:  # the address is taken, or not this machine's
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from hailuo_batch.apixo import TaskStatus
    from hailuo_batch.receiver import ReceiverConfigError, serve
    from hailuo_batch.settings import get_settings

    if args.emit_events:
        from prefect.events import emit_event  # imported up front: hooks run per delivery
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:
            print(
                "warning: PREFECT_API_URL is not set: events go to a temporary local server",
                file=sys.stderr,
            )

    def emit(status: TaskStatus) -> None:
        emit_event(
            event=f"hailuo-batch.task.{status.state.value}",
            resource={
                "prefect.resource.id": f"apixo.task.{status.task_id}",
                "prefect.resource.name": status.task_id,
            },
            payload={"state": status.state.value, "fail_code": status.fail_code},
        )

    try:
        serve(args.host, args.port, get_settings(), on_record=emit if args.emit_events else None)
    except ReceiverConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, OverflowError) as exc:  # the address is taken, or the store is unusable
        print(f"error: the receiver cannot start on {args.host}:{args.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _load_settings() -> None:
    """Read the settings once up front: a malformed one stops here (exit 2), before any work.
    `HAILUO_*` and `APIXO_*` variables that are no setting (typos) are named on stderr."""
    from hailuo_batch.settings import get_settings, unknown_variables

    for name in unknown_variables():
        print(f"warning: {name} is not a setting and is ignored", file=sys.stderr)
    get_settings()


def _undecodable(argv: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as surrogates,
    which no file, log or API call can take), or None."""
    for arg in argv:
        if any("\udc80" <= ch <= "\udcff" for ch in arg):
            return arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


#: what a stopped run or rerun says last (Ctrl-C, SIGTERM): the ledger makes resuming safe
_RESUME = (
    "nothing more is submitted; run the same command again to resume (tasks already "
    "submitted are read again, never paid again)"
)


def _usable_streams() -> None:
    """stdout and stderr that take any text: a stream closed by the caller (`>&-`) becomes
    /dev/null, and one that cannot encode a character (`PYTHONIOENCODING=ascii`, the POSIX
    locale) writes it as an escape instead of raising in the middle of a message."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
            continue
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")


class _Stopped(BaseException):
    """SIGTERM reached the CLI's own handler (outside a flow run, or re-sent by Prefect)."""


class _StopNoise(logging.Filter):
    """`--quiet`: Prefect logs "Crash detected!" and "Finished in state Crashed" for every
    task a stop (Ctrl-C, SIGTERM) cuts short, a hundred red lines at a high concurrency above
    the one line that says how to resume; those records are dropped (the run's state in the
    UI still says it crashed)."""

    SIGNS = ("termination signal", "interrupt signal", "cancelled by the runtime environment")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        return not ("Crash" in text and any(sign in text for sign in self.SIGNS))


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise _Stopped()


def main(argv: list[str] | None = None) -> None:
    from hailuo_batch.settings import BadSettingError

    _usable_streams()
    bad = _undecodable(sys.argv[1:] if argv is None else argv)
    if bad is not None:
        print(f"error: the argument {bad!r} is not valid UTF-8: retype it (or rename the file)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error: what it printed must reach its reader
        _exit_flushed(exc.code if isinstance(exc.code, int) else 2)
    except OSError as exc:  # the help could not be written
        _output_failed(exc)
    handlers = {
        "run": cmd_run,
        "rerun": cmd_rerun,
        "validate": cmd_validate,
        "emulator": cmd_emulator,
        "receiver": cmd_receiver,
    }
    if args.command in ("run", "rerun"):
        # Prefect's SIGTERM bridge raises TerminationSignal, and on its way out sends SIGTERM
        # again to the handler it found: with Python's default there, the process died with
        # -15 (no line, depending on where the signal landed); with this one, every path
        # ends in the one line below and exit 143
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if args.command != "emulator":
            _load_settings()
        code = handlers[args.command](args)
    except BadSettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except ValidationError as exc:
        print(f"error: invalid setting: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        if args.command in ("run", "rerun"):
            print(f"interrupted (Ctrl-C): {_RESUME}", file=sys.stderr)
        code = 130
    except OSError as exc:  # `... | head` (the reader left), or output to a full disk
        _output_failed(exc)
    except BaseException as exc:  # SIGTERM: Prefect raises TerminationSignal in the main thread
        if not isinstance(exc, _Stopped) and type(exc).__name__ != "TerminationSignal":
            raise
        print(f"stopped (SIGTERM): {_RESUME}", file=sys.stderr)
        code = 143
    _exit_flushed(code)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that help it cannot write to stdout is an error (argparse
    drops it silently and exits 0)."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if not message:
            return
        if file is None or file is sys.stderr:
            with contextlib.suppress(OSError):  # a usage error still exits 2
                sys.stderr.write(message)
            return
        file.write(message)


def _output_failed(exc: OSError) -> NoReturn:
    """Exit 1 on output that could not be written: one error line, none when the reader left."""
    if not isinstance(exc, BrokenPipeError):
        with contextlib.suppress(OSError):
            print(f"error: could not write the output: {exc}", file=sys.stderr)
    _exit_flushed(1, said=True)


def _exit_flushed(code: int, said: bool = False) -> NoReturn:
    """Exit with `code` once stdout is flushed; output stdout cannot take (a full disk) is one
    error line (unless already `said`) and exit 1, a reader that left (`| head`) a quiet exit 1."""
    try:
        sys.stdout.flush()
    except OSError as exc:  # no second complaint at exit: stdout goes nowhere from here
        if not (said or isinstance(exc, BrokenPipeError)):
            print(f"error: could not write the output: {exc}", file=sys.stderr)
        code = code or 1
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    main()
