"""Where the daemon answers (a URL, $TASKD_URL or a config's `server.listen`) and its token."""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from taskd.client.errors import AddressError

DEFAULT_URL = "http://127.0.0.1:7700"


@dataclass(frozen=True, slots=True)
class Target:
    """Where the daemon answers (http://, https:// or unix:/path) and the token to show it."""

    url: str
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A daemon URL taken apart: TCP `host` and `port`, or `unix_path`; the API under `prefix`."""

    url: str
    https: bool = False
    host: str = "localhost"
    port: int | None = None
    prefix: str = ""
    unix_path: str | None = None

    @property
    def base(self) -> str:
        """The URL requests go to, but for their path (over a unix socket, any host does)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port is None else f":{self.port}"
        return f"{'https' if self.https else 'http'}://{host}{port}{self.prefix}"


def locate(
    url: str | None, token: str | None, config_path: str | None, env: Mapping[str, str]
) -> Target:
    """The daemon to talk to: `url`, else $TASKD_URL, else the config file's, else the default.

    The token is `token`, else $TASKD_TOKEN, else the config's own when the URL came from it.
    """
    token = token or env.get("TASKD_TOKEN") or None
    url = url or env.get("TASKD_URL")
    if url:
        return Target(url, token)
    server = _server_table(config_path) if config_path is not None else None
    if server is None:
        return Target(DEFAULT_URL, token)
    # Imported here: the config model costs a tenth of a second, most clients never need it.
    from taskd.config import ServerConfig

    listen = server.get("listen", ServerConfig().listen)
    if not isinstance(listen, str):
        raise AddressError(f"{config_path}: server.listen is not a string; pass --url")
    # The config's own token only goes to the address from the same config: never leak it
    # to a URL given elsewhere.
    own_token = server.get("token") if isinstance(server.get("token"), str) else None
    return Target(url_of_listen(listen, str(config_path)), token or own_token)


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
        raise AddressError(message) from None
    server = data.get("server", {})
    return server if isinstance(server, Mapping) else {}


def url_of_listen(listen: str, source: str) -> str:
    """The URL a client on this machine reaches a `server.listen` address at."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise AddressError(f"{source}: server.listen {listen!r} is not host:port; pass --url")
    if int(port) == 0:
        raise AddressError(f"{source}: the daemon listens on a port chosen at start; pass --url")
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


def endpoint(url: str) -> Endpoint:
    """`url` taken apart, or AddressError when it is not http://, https:// or unix:/path."""
    if url.startswith("unix:"):
        path = url.removeprefix("unix:")
        if not path:
            raise AddressError(f"not a daemon URL: {url!r} (unix: needs the socket's path)")
        return Endpoint(url, unix_path=path)
    bad = AddressError(f"not a daemon URL: {url!r} (use http://HOST:PORT or unix:/PATH)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    return Endpoint(
        url,
        https=parts.scheme == "https",
        host=parts.hostname,
        port=port,
        prefix=parts.path.rstrip("/"),
    )
