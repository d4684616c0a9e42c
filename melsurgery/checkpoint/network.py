"""The one timeout policy for every network call: the Hub client (downloads, push) and tune's storage server.

huggingface_hub bounds only its metadata and download requests (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT,
10 s each); its API calls (create_repo, create_commit, the LFS batch, validate-yaml) wait forever on a server
that accepts the connection and never answers, and its retries multiply any wait by six. Here every request
of its client gets a connect, read, write and pool timeout of MELSURGERY_TIMEOUT seconds (default 30), the
two HF_HUB_* timeouts default to the same value (set them to override), and a request that times out is not
retried: the command fails once, with one line, exit 2. A database named by `tune --storage` gets the same
connect timeout.
"""

from __future__ import annotations

import math
import os
import sys
from urllib.parse import unquote, urlsplit

from melsurgery.errors import UserError, quote, register_secret

ENV = "MELSURGERY_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


class NetworkTimeout(TimeoutError):
    """A request got no answer within the timeout; not retried."""


def timeout() -> float:
    """Seconds any network wait may last: $MELSURGERY_TIMEOUT, else 30."""
    return env_seconds(ENV, DEFAULT_TIMEOUT)


def env_seconds(name: str, default: float) -> float:
    """A time bound from environment variable `name` (blank or unset: `default`); anything but a positive finite
    number of seconds is refused in one line."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{name}={quote(raw)}: must be a positive number of seconds")
    return value


def register_url_secrets(url: str | None) -> None:
    """A URL's userinfo (user:password) is a secret wherever it may be printed later, decoded or not."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    for value in (password, user if password else None):
        if value:
            register_secret(value)
            register_secret(unquote(value))


_configured: list[float] = []


def check_endpoint() -> None:
    """$HF_ENDPOINT, when set, is an http(s) URL with a host: huggingface_hub parses it only deep inside a request
    (or an import), where "Invalid IPv6 URL" or "unsupported protocol" was an internal error."""
    raw = os.environ.get("HF_ENDPOINT", "")
    if not raw:
        return
    register_url_secrets(raw)
    try:
        parts = urlsplit(raw)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # an invalid IPv6 literal, a port that is not a number
        ok = False
    if not ok or raw != raw.strip() or any(ord(c) < 0x20 or ord(c) == 0x7f for c in raw):
        raise UserError(f"HF_ENDPOINT={quote(raw)}: not an http:// or https:// URL with a host; fix or unset it")


def configure_hub() -> None:
    """Before the first Hub request (and before huggingface_hub's download module is imported): $HF_ENDPOINT
    checked, the timeout policy on huggingface_hub's client, and its secrets (the token, the userinfo of
    HF_ENDPOINT) registered so that nothing prints them."""
    check_endpoint()
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import close_session, get_session, set_client_factory

    seconds = timeout()
    register_secret(get_token())
    register_url_secrets(constants.ENDPOINT)
    if _configured == [seconds]:
        return
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if not os.environ.get(name):
            setattr(constants, name, seconds)
    close_session()
    template = get_session()  # the client huggingface_hub builds itself: its hooks (offline mode, request ids)
    hooks = template.event_hooks
    http = sys.modules[type(template).__module__.split(".")[0]]
    close_session()

    def client():
        return http.Client(event_hooks=hooks, follow_redirects=True, timeout=http.Timeout(seconds),
                           transport=_no_retry_on_timeout(http, seconds))

    set_client_factory(client)
    _configured[:] = [seconds]


def _no_retry_on_timeout(http, seconds: float):
    """The default transport with every wait bounded (huggingface_hub passes timeout=None to most API calls,
    which would override the client's default) and a timeout turned into NetworkTimeout, which it does not retry."""

    class Transport(http.BaseTransport):
        def __init__(self) -> None:
            self.inner = http.HTTPTransport()

        def handle_request(self, request):
            limits = dict(request.extensions.get("timeout") or {})
            request.extensions["timeout"] = {k: limits.get(k) or seconds for k in ("connect", "read", "write", "pool")}
            try:
                return self.inner.handle_request(request)
            except http.TimeoutException:
                raise NetworkTimeout(f"no answer from {request.url.host} within {seconds:g} s "
                                     f"(set {ENV} to wait longer)") from None

        def close(self) -> None:
            self.inner.close()

    return Transport()


def storage_engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine arguments that bound the connection to a database server (sqlite needs none)."""
    register_url_secrets(url)
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith(("postgresql", "mysql", "mariadb")):
        return {"connect_args": {"connect_timeout": max(1, math.ceil(timeout()))}}
    return {}
