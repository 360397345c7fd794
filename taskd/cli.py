"""The command line: run the daemon, check a config, and ask a running daemon (stats, submit)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import anyio
import orjson

from taskd import __version__, bench, logs
from taskd.client import AddressError, Client, TaskdError
from taskd.config import Config, ConfigError, load, redact
from taskd.daemon import serve
from taskd.jobs import STATES
from taskd.store import REPLY_PARSER

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_USAGE = 2


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser: an option it does not know is its own usage error (argparse
    would leave it to the top-level parser, whose usage says nothing of the subcommand's)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskd", description="A job scheduler daemon on Redis.")
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    parser.add_argument(
        "--config",
        default=os.environ.get("TASKD_CONFIG", "taskd.toml"),
        help="the TOML config file (default: $TASKD_CONFIG or ./taskd.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        help="least severe messages to log (default: info; warning for stats and submit, "
        "which say what went wrong themselves)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="log lines as key=value text or as JSON objects (default: text)",
    )
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Subcommand),
    )
    run = commands.add_parser("run", help="run the daemon (the default)")
    run.add_argument("--config", default=argparse.SUPPRESS, help="the TOML config file")
    check = commands.add_parser(
        "check", help="validate the config file and exit 0, or 2 with its errors"
    )
    check.add_argument("--config", default=argparse.SUPPRESS, help="the TOML config file")
    autoscale = commands.add_parser(
        "autoscale", help="start and stop daemon instances on the fleet's sizing hint"
    )
    autoscale.add_argument("--config", default=argparse.SUPPRESS, help="the TOML config file")
    _client_commands(commands)
    bench.add_parser(commands)
    return parser


def _client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`stats` and `submit`, which talk to a running daemon over its HTTP API."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help="the daemon: http://HOST:PORT or unix:/PATH (default: $TASKD_URL, else the "
        "config file's server.listen, else http://127.0.0.1:7700)",
    )
    common.add_argument(
        "--token",
        help="the [server] token (default: $TASKD_TOKEN, else the config file's when the URL "
        "comes from it)",
    )
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="the config file to take the URL from",
    )
    stats = commands.add_parser("stats", parents=[common], help="show the queues and daemons")
    stats.add_argument("--json", action="store_true", help="print the /stats JSON as it is")
    submit = commands.add_parser("submit", parents=[common], help="submit a job, print it")
    submit.add_argument("type", metavar="TYPE", help="the job type (a configured handler)")
    submit.add_argument(
        "--payload", type=_json_argument, metavar="JSON", help="the payload (default: null)"
    )
    when = submit.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, metavar="SECONDS", help="run it this much later")
    when.add_argument(
        "--run-at", metavar="TIME", help="run it then: RFC 3339 with an offset, or epoch seconds"
    )
    submit.add_argument("--max-attempts", type=int, metavar="N", help="attempts before it fails")
    submit.add_argument(
        "--priority", type=int, metavar="N", help="0 (lowest) to 9 (highest); default 5"
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a repeated submission with this key creates nothing and prints the first job",
    )
    submit.add_argument(
        "--callback-url", metavar="URL", help="POST the job's final record here when it ends"
    )


def _json_argument(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # argparse turns this into a usage error, exit status 2, before anything is sent.
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    asks = args.command in ("stats", "submit")
    logs.setup(args.log_level or ("warning" if asks else "info"), args.log_format)
    if asks:
        return _ask_daemon(args)
    if args.command == "bench":
        return bench.main(args)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"taskd: invalid config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        count = len(config.handlers)
        print(f"{args.config}: ok ({count} handler{'' if count == 1 else 's'})")
        return 0
    if args.command == "autoscale":
        from taskd import autoscaler  # aiohttp's client: only for this command

        return autoscaler.main(config)
    return run(config)


def _ask_daemon(args: argparse.Namespace) -> int:
    """Run `stats` or `submit`: 0 when the daemon answered 2xx, else 1 (2 for bad usage)."""
    try:
        with Client(args.url, token=args.token, config=args.config) as client:
            if args.command == "stats":
                _stats(client, as_json=args.json)
            else:
                _submit(client, args)
    except TaskdError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, AddressError) else 1
    return 0


def _stats(client: Client, *, as_json: bool) -> None:
    stats = client.stats()
    print(orjson.dumps(stats).decode() if as_json else "\n".join(stats_lines(stats)))


def _submit(client: Client, args: argparse.Namespace) -> None:
    job = client.submit(
        args.type,
        args.payload,
        delay=args.delay,
        run_at=None if args.run_at is None else _run_at_value(args.run_at),
        max_attempts=args.max_attempts,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
        callback_url=args.callback_url,
    )
    print(_pretty(job))


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _run_at_value(text: str) -> str | float:
    """`--run-at` as the API takes it: epoch seconds as a number, anything else as given."""
    try:
        seconds = float(text)
    except ValueError:
        return text
    return seconds if math.isfinite(seconds) else text


def stats_lines(stats: Mapping[str, Any]) -> list[str]:
    """/stats as two small tables: the counts per queue, then the live daemons."""
    queues = stats.get("queues")
    rows = [["QUEUE", *(name.upper() for name in STATES)]]
    for name, counts in (queues if isinstance(queues, Mapping) else {}).items():
        counts = counts if isinstance(counts, Mapping) else {}
        rows.append([name, *(_cell(counts.get(key)) for key in STATES)])
    lines = _columns(rows, numeric=range(1, len(STATES) + 1))
    instances = stats.get("instances")
    instances = [i for i in instances if isinstance(i, Mapping)] if instances else []
    if not instances:
        return [*lines, "", "no live daemons"]
    rows = [["INSTANCE", "HOST", "PID", "ACTIVE"]]
    for one in instances:
        busy = f"{_cell(one.get('active'))}/{_cell(one.get('concurrency'))}"
        rows.append([_cell(one.get("id")), _cell(one.get("host")), _cell(one.get("pid")), busy])
    return [*lines, "", *_columns(rows, numeric=(2, 3))]


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _columns(rows: list[list[str]], numeric: range | tuple[int, ...]) -> list[str]:
    """Rows as aligned text, numeric columns flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def run(config: Config) -> int:
    """Run the daemon, with an embedded Redis around it when the config asks for one."""
    if not config.redis.embedded:
        return _run_loop(config, config.redis.url)
    from taskd.embedded import EmbeddedRedisError, RedisServer

    server = RedisServer(data_dir=config.redis.data_dir, tcp=config.redis.embedded_address)
    try:
        server.start()
    except EmbeddedRedisError as exc:
        logger.error("cannot start the embedded Redis: %s", exc)
        return 1
    logger.info("embedded Redis running at %s (pid %s)", redact(server.url), server.pid)
    try:
        return _run_loop(config, server.url)
    finally:
        # Last of all: the daemon has drained and requeued into it.
        server.stop()


def _run_loop(config: Config, url: str) -> int:
    logger.info("taskd %s starting with Redis at %s", __version__, redact(url))
    # What start-up built (modules, classes, config) lives as long as the process: frozen,
    # the collector no longer scans it in each full collection, and with thousands of
    # jobs in flight those come often (see docs/performance.md).
    gc.freeze()
    anyio.run(_serve, config, url, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


async def _serve(config: Config, url: str) -> None:
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    parser = "hiredis" if REPLY_PARSER == "hiredis" else "python (install hiredis for speed)"
    logger.info("event loop: %s; Redis reply parser: %s", loop, parser)
    await serve(config, url)
