"""The command line: `taskd --config FILE` runs the daemon; `taskd check` validates a config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import anyio
from redis.utils import HIREDIS_AVAILABLE

from taskd import __version__
from taskd.config import Config, ConfigError, load
from taskd.daemon import redacted, serve

logger = logging.getLogger("taskd")

EXIT_CONFIG = 2


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
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages to log (default: info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the daemon (the default)")
    check = commands.add_parser(
        "check", help="validate the config file and exit 0, or 2 with its errors"
    )
    check.add_argument("--config", default=argparse.SUPPRESS, help="the TOML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"taskd: invalid config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(f"{args.config}: ok ({len(config.handlers)} handlers)")
        return 0
    return run(config)


def run(config: Config) -> int:
    """Run the daemon, with an embedded Redis around it when the config asks for one."""
    if not config.redis.embedded:
        return _run_loop(config, config.redis.url)
    from taskd.embedded import EmbeddedRedisError, RedisServer

    server = RedisServer(data_dir=config.redis.data_dir)
    try:
        server.start()
    except EmbeddedRedisError as exc:
        logger.error("cannot start the embedded Redis: %s", exc)
        return 1
    logger.info("embedded Redis running at %s (pid %s)", server.url, server.pid)
    try:
        return _run_loop(config, server.url)
    finally:
        # Last of all: the daemon has drained and requeued into it.
        server.stop()


def _run_loop(config: Config, url: str) -> int:
    logger.info("taskd %s starting with Redis at %s", __version__, redacted(url))
    anyio.run(_serve, config, url, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


async def _serve(config: Config, url: str) -> None:
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    parser = "hiredis" if HIREDIS_AVAILABLE else "python (install hiredis for speed)"
    logger.info("event loop: %s; Redis reply parser: %s", loop, parser)
    await serve(config, url)
