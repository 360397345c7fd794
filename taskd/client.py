"""The HTTP client behind `taskd stats` and `taskd submit`: finding the daemon, asking it."""

from __future__ import annotations

import http.client
import ipaddress
import math
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from taskd.config import ServerConfig
from taskd.jobs import STATES

DEFAULT_URL = "http://127.0.0.1:7700"
# Long enough for a daemon whose Redis is slow, short enough that a hung one is noticed.
TIMEOUT = 30.0
COUNTS = STATES  # the columns of `taskd stats`


class ClientError(Exception):
    """A command that cannot be done; the text is for the user, `exit_code` for the shell."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """Where the daemon answers (http://, https:// or unix:/path) and the token to show it."""

    url: str
    token: str | None = None


def locate(url: str | None, token: str | None, config_path: str, env: Mapping[str, str]) -> Target:
    """The daemon to talk to: --url, else $TASKD_URL, else the config file's, else the default."""
    token = token or env.get("TASKD_TOKEN") or None
    url = url or env.get("TASKD_URL")
    if url:
        return Target(url, token)
    server = _server_table(config_path)
    if server is None:
        return Target(DEFAULT_URL, token)
    listen = server.get("listen", ServerConfig().listen)
    if not isinstance(listen, str):
        raise ClientError(f"{config_path}: server.listen is not a string; pass --url", 2)
    # The config's own token only goes to the address from the same config: never leak it
    # to a URL given elsewhere.
    own_token = server.get("token") if isinstance(server.get("token"), str) else None
    return Target(url_of_listen(listen, config_path), token or own_token)


def _server_table(path: str) -> Mapping[str, Any] | None:
    """The [server] table of the config file, or None when there is no such file.

    Only this table is read: a full load would import Python handlers and look for exec
    programs, which a client has no need of and may not even be able to do.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        message = f"cannot read {path} for the daemon's address: {exc}; pass --url"
        raise ClientError(message, 2) from None
    server = data.get("server", {})
    return server if isinstance(server, Mapping) else {}


def url_of_listen(listen: str, source: str) -> str:
    """The URL a client on this machine reaches a `server.listen` address at."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"{source}: server.listen {listen!r} is not host:port; pass --url", 2)
    if int(port) == 0:
        raise ClientError(f"{source}: the daemon listens on a port chosen at start; pass --url", 2)
    return f"http://{_reachable(host)}:{int(port)}"


def _reachable(host: str) -> str:
    """The host itself, or loopback for "listen on every address" (0.0.0.0, [::])."""
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return host  # a name
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"[{ip}]" if ip.version == 6 else str(ip)


def call(target: Target, method: str, path: str, body: Any = None) -> bytes:
    """Send one request and return the body of a 2xx answer; raise ClientError otherwise."""
    connection, prefix = _connection(target.url)
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    try:
        connection.request(method, prefix + path, body=data, headers=headers)
        response = connection.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ClientError(f"cannot reach the daemon at {target.url}: {reason}") from None
    finally:
        connection.close()
    if response.status >= 300:
        raise ClientError(_error_text(response.status, response.reason, answer))
    return answer


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    """An unopened connection to the daemon at `url`, and the path the API lives under."""
    if url.startswith("unix:"):
        return _UnixConnection(url.removeprefix("unix:")), ""
    bad = ClientError(f"not a daemon URL: {url!r} (use http://HOST:PORT or unix:/PATH)", 2)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, port, timeout=TIMEOUT), parts.path.rstrip("/")


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the unix socket a daemon with `listen = "unix:/path"` serves on."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _error_text(status: int, reason: str, answer: bytes) -> str:
    """`404 not_found: no such job ...` from the daemon's JSON error, or what there is."""
    try:
        error = orjson.loads(answer)["error"]
        return f"{status} {error['code']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        # Not our daemon's answer (a proxy's, say): show its start.
        text = " ".join(answer.decode(errors="replace").split())[:200]
        return f"{status} {reason}: {text}" if text else f"{status} {reason}"


def parse_json(answer: bytes, url: str) -> Any:
    try:
        return orjson.loads(answer)
    except orjson.JSONDecodeError:
        raise ClientError(f"the answer from {url} is not JSON: {answer[:200]!r}") from None


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def run_at_value(text: str) -> str | float:
    """`--run-at` as the API takes it: epoch seconds as a number, anything else as given."""
    try:
        seconds = float(text)
    except ValueError:
        return text
    return seconds if math.isfinite(seconds) else text


def stats_lines(stats: Any) -> list[str]:
    """/stats as two small tables: the counts per queue, then the live daemons."""
    stats = stats if isinstance(stats, Mapping) else {}
    queues = stats.get("queues")
    rows = [["QUEUE", *(name.upper() for name in COUNTS)]]
    for name, counts in (queues if isinstance(queues, Mapping) else {}).items():
        counts = counts if isinstance(counts, Mapping) else {}
        rows.append([name, *(_cell(counts.get(key)) for key in COUNTS)])
    lines = _columns(rows, numeric=range(1, len(COUNTS) + 1))
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
