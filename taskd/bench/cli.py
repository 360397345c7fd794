"""`taskd bench` on the command line: its parser, its options, and its exit codes."""

from __future__ import annotations

import argparse
import sys

import orjson

from taskd.bench.harness import SOAK_RATE, SOAK_SECONDS, BenchError, SoakPlan
from taskd.bench.report import as_json, medians, render
from taskd.bench.runner import WORKLOADS, Options, run

# Opt-in workloads: they run only when --only names them.
OPT_IN = ("memory", "rtt", "soak", "archive", "archive-queries")
# What --url can run: these need no daemon of our own and no access to its Redis.
REMOTE_WORKLOADS = ("intake-single", "intake-batch", "pickup")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`taskd bench`, for the command line's subcommands."""
    bench = commands.add_parser(
        "bench",
        help="measure intake, pick-up and throughput on a throwaway Redis and daemons",
        description="Start a throwaway Redis and daemons, run the workloads, print the median, "
        "min and max of each figure over the rounds, and clean everything up.",
    )
    bench.add_argument("--quick", action="store_true", help="1 round of tiny sizes (a smoke test)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument(
        "--rounds", type=_positive, metavar="N", help="rounds per workload (default 3; --quick 1)"
    )
    bench.add_argument(
        "--only", nargs="+", choices=list(WORKLOADS), metavar="NAME",
        help=f"run only these workloads: {', '.join(WORKLOADS)} "
        f"({', '.join(OPT_IN)} only when named here)",
    )  # fmt: skip
    bench.add_argument(
        "--soak-seconds", type=_positive, metavar="N",
        help=f"how long soak submits jobs (default {SOAK_SECONDS[0]}; --quick {SOAK_SECONDS[1]})",
    )  # fmt: skip
    bench.add_argument(
        "--soak-rate", type=_positive, metavar="R",
        help=f"jobs/s soak submits (default {SOAK_RATE[0]:,}; --quick {SOAK_RATE[1]:,})",
    )  # fmt: skip
    bench.add_argument(
        "--compare", type=_report_file, metavar="FILE",
        help="show each figure's median in FILE (an earlier --json run) and the change from it",
    )  # fmt: skip
    bench.add_argument(
        "--url",
        help="bench a running daemon instead (http://HOST:PORT or unix:/PATH; "
        f"runs {', '.join(REMOTE_WORKLOADS)} only, with its own handlers; token: $TASKD_TOKEN)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _report_file(path: str) -> dict[tuple[str, str], float]:
    try:
        with open(path, "rb") as f:
            return medians(orjson.loads(f.read()))
    except (OSError, orjson.JSONDecodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot compare with {path}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    """Run `taskd bench`: 0 with the results printed, 1 if it failed, 2 for bad usage."""
    if args.only:
        workloads = tuple(name for name in WORKLOADS if name in args.only)
    else:
        workloads = tuple(name for name in WORKLOADS if name not in OPT_IN)
    if args.url is not None:
        workloads = tuple(name for name in workloads if name in REMOTE_WORKLOADS)
        if args.only and set(args.only) - set(REMOTE_WORKLOADS):
            wrong = ", ".join(sorted(set(args.only) - set(REMOTE_WORKLOADS)))
            print(
                f"taskd bench: with --url only {', '.join(REMOTE_WORKLOADS)} run, not {wrong}",
                file=sys.stderr,
            )
            return 2
    if args.compare is not None and args.json:
        print("taskd bench: --compare adds columns to the table, not to --json", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    soak = SoakPlan(
        args.soak_seconds or SOAK_SECONDS[args.quick], args.soak_rate or SOAK_RATE[args.quick]
    )
    options = Options(args.quick, args.json, rounds, workloads, args.url, soak)
    try:
        report = run(options)
    except KeyboardInterrupt:
        print("taskd bench: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    except (BenchError, BaseExceptionGroup) as exc:
        error = _bench_error(exc)
        if error is None:
            raise
        print(f"taskd bench: {error}", file=sys.stderr)
        return 1
    if options.as_json:
        print(as_json(report))
    else:
        print(render(report, options.rounds, options.quick, args.compare))
    return 0


def _bench_error(exc: BaseException) -> BenchError | None:
    """The BenchError behind `exc`, which task groups wrap in exception groups; None when
    something else (a bug) is in there too, which must not be hidden."""
    if isinstance(exc, BenchError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(BenchError)
        if errors is not None and rest is None:
            return _bench_error(errors.exceptions[0])
    return None
