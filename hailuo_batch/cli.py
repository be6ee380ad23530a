"""`hailuo-batch`: run batches, validate manifests, and start the local apixo emulator.

Exit codes:
  0  success: `validate` found every row valid; `run`/`rerun` completed (even with some items
     skipped, failed or invalid: the results file says which)
  1  `validate` found invalid rows or could not use the manifest; a run failed (its flow run
     ended Failed or Crashed, e.g. an unreadable manifest or an unreachable API)
  2  bad usage or a bad setting (option, HAILUO_* / APIXO_* variable, --output): reported in one
     line before the manifest is read and before anything is paid
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

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

exit codes: 0 success, 1 invalid rows (validate) or a failed run, 2 bad usage or setting
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


def _add_item_defaults(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=["standard", "pro"],
        default="standard",
        help="mode for rows without one (default: standard, 768p, billed per second)",
    )
    p.add_argument(
        "--duration",
        type=int,
        choices=[6, 10],
        default=6,
        help="clip length in seconds for standard rows without one (default: 6)",
    )
    p.add_argument(
        "--provider",
        choices=["auto", "value", "official"],
        default="auto",
        help="provider routing for rows without one (default: auto)",
    )


def _statuses() -> list[Any]:
    from hailuo_batch.results import ItemStatus

    return list(ItemStatus)


def _add_money_guards(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-cost",
        type=_usd,
        default=None,
        metavar="USD",
        help="stop submitting once the estimated spend would pass USD",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument(
        "--output",
        "-o",
        default=None,
        help="output path or URL (default: HAILUO_OUTPUT or ./output)",
    )
    _add_item_defaults(p)
    p.add_argument(
        "--concurrency",
        type=_concurrency,
        default=10,
        help="most items in flight at once, 1 to 500 (default: 10; the run finds the "
        "provider's real limit below it)",
    )
    p.add_argument(
        "--request-type",
        choices=["async", "callback"],
        default="async",
        help="async: poll every task (default). callback: the provider POSTs results to "
        "`hailuo-batch receiver` (needs HAILUO_CALLBACK_URL, _TOKEN, _STORE); a slow poll "
        "recovers lost callbacks",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and estimate cost; submit nothing"
    )
    p.add_argument("--credentials-block", help="name of an ApixoCredentials block")
    p.add_argument("--storage-block", help="name of an OutputStorage block")
    _add_money_guards(p)
    p.add_argument(
        "--fit-to-balance",
        action="store_true",
        help="if the batch costs more than the balance, submit what fits (default: fail first)",
    )
    p.add_argument(
        "--max-failure-share",
        type=_share,
        default=None,
        metavar="0..1",
        help="end the run Failed (exit 1) when more than this share of items did not succeed "
        "(default: only when none succeeded)",
    )
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
        choices=[s.value for s in _statuses()],
        help="status to rerun (repeatable; default: failed, not_submitted, uncertain)",
    )
    r.add_argument("--fail-code", action="append", help="only this failCode (repeatable)")
    r.add_argument("--id", action="append", dest="ids", help="only this item id (repeatable)")
    r.add_argument("--mode", choices=["standard", "pro"], help="override the mode")
    r.add_argument("--duration", type=int, choices=[6, 10], help="override the duration")
    r.add_argument("--provider", choices=["auto", "value", "official"], help="override provider")
    r.add_argument("--prompt-suffix", help="text appended to every prompt")
    r.add_argument("--output", "-o", help="output (default: the one the results file is in)")
    r.add_argument(
        "--concurrency",
        type=_concurrency,
        default=10,
        help="items in flight, 1 to 500 (default: 10)",
    )
    r.add_argument("--credentials-block", help="name of an ApixoCredentials block")
    r.add_argument(
        "--storage-block",
        help="name of an OutputStorage block (its S3 options reach the results file and output)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="show the selection and what submitting it would cost; submit nothing",
    )
    r.add_argument(
        "--resubmit-lost",
        action="store_true",
        help="pay for a new task for items whose task the provider lost (TASK_NOT_FOUND, "
        "POLL_TIMEOUT); reported as possible duplicate charges (default: read them again)",
    )
    _add_money_guards(r)
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
    _add_item_defaults(v)
    v.add_argument("--json", action="store_true", help="print a JSON report instead of text")

    e = sub.add_parser(
        "emulator",
        help="start the local apixo emulator (for demos, tests, benchmarks)",
        description="Serve the apixo hailuo-2-3-fast API contract locally.",
    )
    e.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    e.add_argument("--port", type=int, default=8787, help="port (default: 8787, 0: any free)")
    e.add_argument("--api-key", default=None, help="accept only this key (default: any non-empty)")
    e.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply provider-side times: 0.01 makes a 120 s generation take 1.2 s",
    )
    e.add_argument("--concurrency", type=int, default=20, help="tasks in flight per key before 429")
    e.add_argument(
        "--fault-rate", type=float, default=0.0, help="probability of an injected fault per call"
    )
    e.add_argument(
        "--hostile",
        action="store_true",
        help="random faults include malformed status answers and non-video downloads",
    )
    e.add_argument("--seed", type=int, default=None, help="random seed for faults and timings")
    e.add_argument("--balance", type=float, default=1000.0, help="starting balance in USD")
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
    rcv.add_argument("--port", type=int, default=8788, help="port (default: 8788)")
    rcv.add_argument(
        "--emit-events",
        action="store_true",
        help="emit a Prefect event per completed task (hailuo-batch.task.success/failed)",
    )
    return parser


def _mode(name: str) -> Any:
    from hailuo_batch.apixo import Mode

    return Mode.PRO if name == "pro" else Mode.STANDARD


def _defaults(args: argparse.Namespace) -> Any:
    from hailuo_batch.apixo import Provider
    from hailuo_batch.manifest import ItemDefaults

    return ItemDefaults(
        mode=_mode(args.mode), duration=args.duration, provider=Provider(args.provider)
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from hailuo_batch.manifest import ManifestError, load_manifest
    from hailuo_batch.policy import Prices, estimate_cost
    from hailuo_batch.settings import check_output_url, get_settings, output_is_local
    from hailuo_batch.validation import preflight

    settings = get_settings()
    if args.output is not None:
        output = check_output_url(args.output, name="--output")
    else:
        output = check_output_url(settings.output, name="HAILUO_OUTPUT")
    local_output = output_is_local(output)
    try:
        manifest = load_manifest(args.manifest, _defaults(args))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
                    "manifest": args.manifest,
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
        print(
            f"{args.manifest}: {manifest.total_rows} rows, {len(valid)} valid, "
            f"{invalid_rows} invalid"
        )
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

    def on_progress(state: prog.ProgressState) -> None:
        counts = " ".join(f"{k}={v}" for k, v in sorted(state.by_status.items()))
        bar.update(bar_task, total=state.total, completed=state.done, description=counts)

    prog.add_listener(on_progress)
    try:
        with bar:
            state = run_flow_sync(flow_fn, **params)
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
        print(f"estimated cost: ${summary['estimated_cost_usd']:,.2f} (this run)")
        problems = summary.get("problems") or []
        for p in problems:
            print(f"  {p['status']:<13} {p['id']}: {p['reason']}")
        more = summary.get("problems_total", len(problems)) - len(problems)
        if more > 0:
            print(f"  ... and {more} more (see the results file)")
    link = _ui_link(state)
    if link:
        print(f"Prefect:  {link}")
    if state.is_completed():
        if state.message:
            print(f"note:     {state.message}")
        return 0
    print(f"run failed: {state.message}", file=sys.stderr)
    return 1


def _ui_link(state: Any) -> str | None:
    """The flow run's page in the Prefect UI, when a UI is configured."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    run_id = getattr(getattr(state, "state_details", None), "flow_run_id", None)
    if not ui or run_id is None:
        return None
    return f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}"


def _check_output(output: str | None, storage_block: str | None) -> str | None:
    """The --output given (checked), or the default when no storage block names one.

    A bad output is a bad setting: `BadSettingError` (exit 2) before the manifest is read.
    """
    from hailuo_batch.settings import check_output_url, get_settings

    if output is not None:
        return check_output_url(output, name="--output")
    if not storage_block:
        check_output_url(get_settings().output, name="HAILUO_OUTPUT")
    return None


def _missing_api_key(credentials_block: str | None) -> bool:
    """True (and says so) when neither APIXO_API_KEY nor a credentials block gives a key."""
    from hailuo_batch.settings import get_settings

    if credentials_block or get_settings().apixo_api_key is not None:
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
    No API URL configured: say in one line that a temporary server is used, and keep that
    server and this process from sending usage data (`DO_NOT_TRACK`, server analytics off).
    """
    if quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    print(TEMPORARY_SERVER_NOTE, file=sys.stderr)


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of USD (0 or more, e.g. 25)")
    return value


def _concurrency(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 500")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share from 0 to 1 (e.g. 0.2)")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    output = _check_output(args.output, args.storage_block)
    if _missing_api_key(args.credentials_block):
        return 2
    _prepare_prefect(args.quiet)

    from flows.batch import generate_videos
    from hailuo_batch.apixo import RequestType

    defaults = _defaults(args)
    return _run_with_progress(
        generate_videos,
        args.quiet,
        manifest=args.manifest,
        output=output,
        mode=defaults.mode,
        duration=defaults.duration,
        provider=defaults.provider,
        concurrency=args.concurrency,
        request_type=RequestType(args.request_type),
        dry_run=args.dry_run,
        credentials_block=args.credentials_block,
        storage_block=args.storage_block,
        max_cost_usd=args.max_cost,
        fit_to_balance=args.fit_to_balance,
        max_failure_share=args.max_failure_share,
    )


def cmd_rerun(args: argparse.Namespace) -> int:
    output = None if args.output is None else _check_output(args.output, None)
    if _missing_api_key(args.credentials_block):
        return 2
    _prepare_prefect(args.quiet)

    from flows.rerun import rerun_failed
    from hailuo_batch.apixo import Provider
    from hailuo_batch.rerun import DEFAULT_RERUN_STATUSES

    return _run_with_progress(
        rerun_failed,
        args.quiet,
        results=args.results,
        statuses=args.status or [s.value for s in DEFAULT_RERUN_STATUSES],
        fail_codes=args.fail_code,
        ids=args.ids,
        mode=None if args.mode is None else _mode(args.mode),
        duration=args.duration,
        provider=None if args.provider is None else Provider(args.provider),
        prompt_suffix=args.prompt_suffix,
        output=output,
        concurrency=args.concurrency,
        max_cost_usd=args.max_cost,
        credentials_block=args.credentials_block,
        storage_block=args.storage_block,
        resubmit_lost=args.resubmit_lost,
        dry_run=args.dry_run,
    )


def _summary_of(state: Any) -> dict[str, Any] | None:
    try:
        data = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a failed run may carry no data; reported by the caller
        return None
    return data if isinstance(data, dict) else None


def cmd_emulator(args: argparse.Namespace) -> int:
    from hailuo_batch.emulator import EmulatorConfig, serve

    serve(
        EmulatorConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            time_scale=args.time_scale,
            concurrency=args.concurrency,
            fault_rate=args.fault_rate,
            hostile_faults=args.hostile,
            seed=args.seed,
            balance_usd=args.balance,
            fps=args.fps,
            files_dir=args.files_dir,
        )
    )
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
    return 0


def _load_settings() -> None:
    """Read the settings once up front: a malformed one stops here (exit 2), before any work.
    `HAILUO_*` variables that are no setting (typos) are named on stderr."""
    from hailuo_batch.settings import get_settings, unknown_variables

    for name in unknown_variables():
        print(f"warning: {name} is not a setting and is ignored", file=sys.stderr)
    get_settings()


def main(argv: list[str] | None = None) -> None:
    from hailuo_batch.settings import BadSettingError

    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "rerun": cmd_rerun,
        "validate": cmd_validate,
        "emulator": cmd_emulator,
        "receiver": cmd_receiver,
    }
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
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
