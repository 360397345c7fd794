"""Who may use the API: requests name this daemon's host, writes come from its own pages or
from programs, JSON bodies say they are JSON, and guarded endpoints carry the token."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from taskd.config import ServerConfig
from taskd.validation import ApiError

# Methods that change nothing: a foreign page may cause them (it cannot read the answer,
# which the browser keeps from it without CORS headers, and we send none).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Most distinct Host headers whose verdict is remembered.
HOST_CACHE = 256


def browser_guard(server: ServerConfig) -> Middleware:
    """Middleware against the two ways a web page in the operator's browser reaches a
    daemon it should not:

    - DNS rebinding: the page's own name made to resolve to this address sends that name
      as Host. A Host must be an IP address, localhost (or *.localhost), or one of
      [server] allowed_hosts: 421 otherwise. A unix socket is out of a browser's reach.
    - Cross-site writes: a page may POST to any address (a "simple" request needs no
      preflight). A write whose Origin is not the daemon's own is refused with 403.
      Programs (curl, clients) send no Origin and are not affected.
    """
    allowed = frozenset(server.allowed_hosts)
    any_host = "*" in allowed or server.unix_path is not None
    # Host headers seen, and whether they may pass: nearly every request repeats one of a
    # few, and parsing it (an IP address?) on each would cost a few percent of intake.
    verdicts: dict[str, bool] = {}

    def known(host: str) -> bool:
        verdict = verdicts.get(host)
        if verdict is None:
            if len(verdicts) >= HOST_CACHE:
                verdicts.clear()  # a client making up hosts gets no memory of them
            verdict = verdicts[host] = _known_host(host, allowed)
        return verdict

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None and not any_host and not known(host):
            raise ApiError(
                421,
                "misdirected",
                f"this daemon does not answer to the host {_name(host)!r}: use its address,"
                " or list the name in [server] allowed_hosts",
            )
        origin = request.headers.get("Origin")
        if request.method not in SAFE_METHODS and not _own_origin(request, origin, host):
            raise ApiError(
                403,
                "forbidden_origin",
                f"writes are taken from this daemon's own pages and from programs, not"
                f" from pages of {origin}",
            )
        return await handler(request)

    return guard


def _own_origin(request: web.Request, origin: str | None, host: str | None) -> bool:
    """No Origin (a program), or this daemon's own (its dashboard)."""
    if origin is None:
        return True
    return host is not None and origin.lower() == f"{request.scheme}://{host}".lower()


def require_json(request: web.Request) -> None:
    """Refuse a body that does not say it is JSON: an HTML form or a `text/plain` fetch
    from a foreign page is sent without asking the daemon first; a JSON one is not."""
    # The header as programs send it passes without being parsed (aiohttp's parse of it
    # cost 1% of the intake's CPU); any other is parsed, parameters and case and all.
    if request.headers.get("Content-Type") == "application/json":
        return
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as JSON, with Content-Type: application/json"
            f" (got {request.content_type or 'none'})",
        )


def _name(host: str) -> str:
    """The host name (or address) of a Host header, without its port."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _known_host(host: str, allowed: Collection[str]) -> bool:
    name = _name(host).lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True  # no rebinding through an address: the browser asked for this very one


def token_needed(server: ServerConfig) -> Callable[[str, str], bool]:
    """Whether a request (method, path) needs [server] token, when one is set: every one
    does, except the dashboard's page and files (they hold no data: the page asks for the
    token), and what public_reads, public_health and public_metrics leave open. The guard
    below and the OpenAPI document (taskd.openapi) both ask it."""
    open_paths = {"/"}
    if server.public_health:
        open_paths.add("/health")
    if server.public_metrics:
        open_paths.add("/metrics")

    def needed(method: str, path: str) -> bool:
        if path in open_paths or path.startswith("/static/"):
            return False
        return not (server.public_reads and method in SAFE_METHODS)

    return needed


def token_guard(server: ServerConfig) -> Middleware:
    """Middleware: with [server] token set, the endpoints token_needed names need it, as
    `Authorization: Bearer TOKEN`. Never in the URL: URLs end up in logs and histories."""
    token = server.token
    needed = token_needed(server)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or not needed(request.method, request.path) or _presented(request, token):
            return await handler(request)
        return web.json_response(
            {"error": {"code": "unauthorized", "message": "this needs the [server] token"}},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    return guard


def _presented(request: web.Request, token: str) -> bool:
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(offered.strip().encode(), token.encode())
