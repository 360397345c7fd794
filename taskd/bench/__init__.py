"""`taskd bench`: throughput, latency and Redis costs, measured on a throwaway setup."""

from taskd.bench.cli import add_parser, main
from taskd.bench.harness import SIZES, BenchError
from taskd.bench.report import Figure, Result, aggregate, percentile
from taskd.bench.runner import WORKLOADS
from taskd.bench.soak import growth
from taskd.bench.workloads import stamp

__all__ = [
    "SIZES",
    "WORKLOADS",
    "BenchError",
    "Figure",
    "Result",
    "add_parser",
    "aggregate",
    "growth",
    "main",
    "percentile",
    "stamp",
]
