"""URLs in the configuration: the Redis and http handler URL checks, and the one redactor."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# Everything between "scheme://" and the last "@": user names and passwords. The last, as
# urlsplit takes it, so that a password with an "@" in it is hidden whole.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^@]*@(?:[^@]*@)*")
_DB_PATH = re.compile(r"/?|/[0-9]+")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&]*")


def redact(url: str) -> str:
    """The URL with its user name and password hidden, for logs and messages."""
    return _USERINFO.sub(r"\1***@", url)


def redact_postgres(url: str) -> str:
    """A PostgreSQL URL with its credentials hidden: the user info, and a password given
    as a query parameter."""
    return _PASSWORD_PARAM.sub(r"\1***", redact(url))


def postgres_url_problem(url: str) -> str | None:
    """What is wrong with an [archive] url, or None."""
    shown = redact_postgres(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        return f"invalid URL {shown!r}: {e}"
    if parts.scheme not in ("postgresql", "postgres"):
        return f"must be a postgresql:// URL, got {shown!r}"
    return None


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a [redis] url, or None."""
    if url == "embedded":
        return None
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        return f"invalid URL {shown!r}: {e}"
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            return f"a {parts.scheme}:// URL needs a host, got {shown!r}"
        if not _DB_PATH.fullmatch(parts.path):
            return f"the database must be a number, as in redis://host:6379/0, got {shown!r}"
        return None
    if parts.scheme == "unix":
        if not parts.path:
            return f"a unix:// URL needs a socket path, as in unix:///run/redis.sock, got {shown!r}"
        return None
    return f'must be "embedded" or a redis://, rediss:// or unix:// URL, got {shown!r}'


def cluster_url_problem(url: str) -> str | None:
    """What is wrong with `url` as the node a Redis Cluster is found from, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        shown = redact(url)
        return f"a Redis Cluster needs the redis:// or rediss:// url of a node, got {shown!r}"
    if parts.path.strip("/") not in ("", "0"):
        return f"a Redis Cluster has only database 0, got {redact(url)!r}"
    return None


def http_url_problem(url: str) -> str | None:
    """What is wrong with an http handler's URL, or None."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        ok = False
    return None if ok else f"must be an http:// or https:// URL with a host, got {redact(url)!r}"
