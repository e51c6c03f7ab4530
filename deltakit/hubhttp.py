"""Every Hub request bounded in time, and the errors that mean "the Hub could not be reached".

huggingface_hub sends its metadata requests (repo info, file listings, searches) without any timeout and retries a
timed-out request up to five times with back-off, so an endpoint that accepts connections and never answers used to
block for minutes or for ever. :func:`bound_hub_requests` installs a client that gives each request a timeout and
turns the first timeout into a :class:`~deltakit.refs.SourceError` naming the host.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

from deltakit.refs import SourceError

__all__ = ["CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "bound_hub_requests", "hub_network_errors", "hub_timeouts"]

#: Seconds allowed to open a connection to the Hub (less when the read timeout is smaller).
CONNECT_TIMEOUT_S = 10.0
#: Seconds allowed between two reads from the Hub when ``HF_HUB_DOWNLOAD_TIMEOUT`` is not set.
READ_TIMEOUT_S = 30.0


def hub_timeouts() -> dict[str, float]:
    """The timeouts, in seconds, that a Hub request gets when huggingface_hub gives it none.

    ``read`` and ``write`` are ``HF_HUB_DOWNLOAD_TIMEOUT`` when set, else :data:`READ_TIMEOUT_S`; ``connect`` and
    ``pool`` are :data:`CONNECT_TIMEOUT_S`, or the read timeout when that is smaller. The variable is read at each
    request. File downloads and their metadata requests keep huggingface_hub's own timeouts
    (``HF_HUB_DOWNLOAD_TIMEOUT`` and ``HF_HUB_ETAG_TIMEOUT``, 10 s each by default).

    Returns:
        ``{"connect": ..., "read": ..., "write": ..., "pool": ...}``, the keys of an httpx timeout.
    """
    read = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or READ_TIMEOUT_S)
    connect = min(CONNECT_TIMEOUT_S, read)
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _http() -> ModuleType:
    """The HTTP library huggingface_hub talks through: httpx2 from its v2, httpx before."""
    try:
        from huggingface_hub.utils import httpx  # huggingface_hub >= 1.30 exports the module it uses
    except ImportError:  # older 1.x releases use httpx
        import httpx
    return httpx


def hub_network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached".

    ``OfflineModeIsEnabled`` and many connection failures are ``OSError`` subclasses; huggingface_hub lets the
    transport errors of its HTTP library (connection refused, DNS failures) through unchanged.
    """
    return OSError, _http().TransportError


def _timeout_error(request: Any, err: Exception) -> SourceError:
    """The message for a Hub request that timed out: the host, the timeout used, what to do."""
    phase = type(err).__name__.removesuffix("Timeout").lower()  # from ConnectTimeout, ReadTimeout, ...
    seconds = request.extensions["timeout"].get(phase)
    host = f"{request.url.scheme}://{request.url.netloc.decode()}"
    waited = "accept a connection" if phase == "connect" else "answer"
    return SourceError(
        f"the Hub at {host} did not {waited} within {seconds:g} s ({request.method} {request.url.path}). Check the "
        "network and HF_ENDPOINT; if the Hub is only slow, raise HF_HUB_DOWNLOAD_TIMEOUT (seconds); to work from the "
        "local cache, set HF_HUB_OFFLINE=1."
    )


def _bounded_client_class() -> type:
    """An HTTP client class that gives each request :func:`hub_timeouts` and turns a timeout into a SourceError.

    The SourceError is not one of the errors huggingface_hub retries or falls back on, so one timed-out request
    ends the whole call: the wait is bounded by one request's timeouts, not multiplied by retries.
    """
    http = _http()

    class BoundedStream(http.SyncByteStream):
        """A streamed response body whose read timeouts end the call too (file downloads stream)."""

        def __init__(self, stream: Any, request: Any) -> None:
            self._stream, self._request = stream, request

        def __iter__(self):
            try:
                yield from self._stream
            except http.TimeoutException as err:
                raise _timeout_error(self._request, err) from err

        def close(self) -> None:
            self._stream.close()

    class BoundedClient(http.Client):
        def send(self, request: Any, **kwargs: Any) -> Any:
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                key: given[key] if given.get(key) is not None else value for key, value in hub_timeouts().items()
            }
            try:
                response = super().send(request, **kwargs)
            except http.TimeoutException as err:
                raise _timeout_error(request, err) from err
            response.stream = BoundedStream(response.stream, request)
            return response

    return BoundedClient


@functools.cache
def bound_hub_requests() -> None:
    """Bound every request huggingface_hub sends in this process (once; later calls do nothing).

    huggingface_hub sends its metadata requests without a timeout (``timeout=None`` overrides any default of the
    client) and retries timed-out requests up to five times with back-off. This installs, with
    ``huggingface_hub.set_client_factory``, a client that fills in :func:`hub_timeouts` where a request has none and
    raises :class:`SourceError` (naming the host, the timeout and what to do) at the first timeout. The client keeps
    the event hooks of the session it replaces (offline switch, request ids); a custom transport set with
    ``set_client_factory`` before (e.g. for a proxy certificate) is replaced.
    """
    from huggingface_hub import get_session, set_client_factory

    session = get_session()
    hooks, follow_redirects = session.event_hooks, session.follow_redirects
    client_class = _bounded_client_class()
    set_client_factory(lambda: client_class(event_hooks=hooks, follow_redirects=follow_redirects, timeout=None))


# The fields each kind of reference uses; the others stay None.
