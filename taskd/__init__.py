"""taskd: a job scheduler daemon on Redis."""

__version__ = "0.1.0"
