"""Back-pressure for request bodies on Ray Serve 2.60's HTTP path.

Ray Serve moves a request body in two hops, each into a queue with no bound: its HTTP proxy
reads the client socket as fast as the client sends into a `MessageQueue` (proxy.py,
`proxy_asgi_receive`), and the replica pulls every queued batch into an `asyncio.Queue`
(`ASGIReceiveProxy.fetch_until_disconnect`) whatever the handler has read. A 50 MiB upload
from a fast client is therefore held whole in both processes before the ingress can refuse it.

Bounding each queue to `HIGH_WATER_BYTES` of body makes the body flow at the pace the ingress
reads it: the proxy stops reading the socket (uvicorn then pauses the transport and TCP pushes
back on the client) while the replica has not pulled, and the replica stops pulling while the
handler has not read. Neither queue blocks anything but the next body message: a full queue
always drains as its consumer reads, and Serve cancels both pulling tasks when the response
is done, so a handler that answers without reading the body (403, 429) still finishes.

Ray's opt-in direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`, with HAProxy in front:
`RAY_SERVE_ENABLE_HA_PROXY=1`) has no proxy hop: the ingress replica runs its own HTTP server, and
`ASGIDIReceiveProxy` drains uvicorn's `receive` into an unbounded queue for the handler. Bounding
that one as well makes uvicorn stop reading the socket once HIGH_WATER_BYTES wait for the handler.

Ray offers no setting for this, so the queue classes are wrapped in place, once per process:
the replica side by the ingress at start (`bound_replica_receive`, `bound_direct_ingress_receive`),
the proxy side by the proxy's start-up hook (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.backpressure:install_in_proxy`
in the environment of every Ray node; scripts/serve.sh, the Dockerfile and the k8s manifests
set it). Both check the Ray internals they rely on and leave Ray as it is, with a warning,
when those are not there.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

HIGH_WATER_BYTES = 2 * 1024 * 1024  # per queue: 1 MiB cost 40 % of loopback upload speed, 2 MiB 25 %
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "deployments.backpressure:install_in_proxy"

log = logging.getLogger(__name__)


def _body_bytes(message: Any) -> int:
    if isinstance(message, dict) and message.get("type") == "http.request":
        return len(message.get("body", b""))
    return 0


def install_in_proxy() -> list:
    """Start-up hook of each Serve proxy: bound its receive queues. Returns the (no) extra
    middlewares the hook is expected to return."""
    from ray.serve._private import http_util

    bound_proxy_receive(http_util.MessageQueue)
    return []


def bound_proxy_receive(queue_class: type) -> bool:
    """Make `queue_class` (Ray's proxy-side `MessageQueue`) hold at most about
    HIGH_WATER_BYTES of request body: putting a body message waits until the consumer has
    taken enough of what is queued. Returns whether the class is bounded."""
    if getattr(queue_class, "_bounded_body", False):
        return True
    methods = ("__call__", "get_messages_nowait", "get_one_message", "close")
    if not (hasattr(queue_class(), "_closed") and all(hasattr(queue_class, m) for m in methods)):
        log.warning("Ray's MessageQueue changed: request bodies are not back-pressured in the proxy")
        return False
    put, take_all, take_one, close = (getattr(queue_class, m) for m in methods)

    def state(queue) -> dict:
        # body bytes queued (a running count: a queue of many tiny messages costs no scan) and
        # the event a waiting producer sleeps on
        if "_body" not in queue.__dict__:
            queue._body = {"bytes": 0, "taken": asyncio.Event()}
        return queue._body

    def taken(queue, n: int) -> None:
        body = state(queue)
        body["bytes"] -= n
        body["taken"].set()

    async def bounded_put(self, message) -> None:
        n = _body_bytes(message)
        if n:
            body = state(self)
            while not self._closed and body["bytes"] >= HIGH_WATER_BYTES:
                body["taken"].clear()
                await body["taken"].wait()
        await put(self, message)  # raises once the queue is closed, as Ray's does
        state(self)["bytes"] += n

    def bounded_take_all(self) -> list:
        messages = take_all(self)
        taken(self, sum(map(_body_bytes, messages)))
        return messages

    async def bounded_take_one(self):
        message = await take_one(self)
        taken(self, _body_bytes(message))
        return message

    def close_and_wake(self) -> None:
        close(self)
        state(self)["taken"].set()

    for name, method in zip(methods, (bounded_put, bounded_take_all, bounded_take_one, close_and_wake)):
        setattr(queue_class, name, method)
    queue_class._bounded_body = True
    return True


class BodyQueue(asyncio.Queue):
    """The replica's receive queue, counting the request body it holds: `room()` waits while
    that is at least HIGH_WATER_BYTES (so the queue is never empty then)."""

    def __init__(self) -> None:
        super().__init__()
        self.body_bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        self.body_bytes += _body_bytes(item)
        if self.body_bytes >= HIGH_WATER_BYTES:
            self._room.clear()

    def get_nowait(self):
        item = super().get_nowait()
        self.body_bytes -= _body_bytes(item)
        if self.body_bytes < HIGH_WATER_BYTES:
            self._room.set()
        return item

    async def room(self) -> None:
        await self._room.wait()


def bound_replica_receive(receive_class: type | None = None) -> bool:
    """Make Ray's replica-side `ASGIReceiveProxy` pull the next batch from the proxy only while
    less than HIGH_WATER_BYTES of body waits for the handler. Returns whether it is bounded."""
    if receive_class is None:
        from ray.serve._private.http_util import ASGIReceiveProxy as receive_class
    if getattr(receive_class, "_bounded_body", False):
        return True
    init = receive_class.__init__
    probe = receive_class({"type": "http"}, None, None)
    if not (hasattr(probe, "_queue") and hasattr(probe, "_receive_asgi_messages")
            and hasattr(receive_class, "fetch_until_disconnect")):
        log.warning("Ray's ASGIReceiveProxy changed: request bodies are not back-pressured in the replica")
        return False

    def bounded_init(self, scope, request_metadata, receive_asgi_messages) -> None:
        queue = BodyQueue()

        async def pull(metadata):
            await queue.room()
            return await receive_asgi_messages(metadata)
        init(self, scope, request_metadata, pull)
        self._queue = queue

    receive_class.__init__ = bounded_init
    receive_class._bounded_body = True
    return True


class _BodyRoom:
    """Body bytes pulled from uvicorn and not yet read by the handler. The pulls run in Serve's
    event loop, the reads in the user code's (another thread's, by default), so the count is
    locked and the waiting puller is woken through its own loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None

    async def wait(self) -> None:
        """Return once less than HIGH_WATER_BYTES wait for the handler (in the pulling loop)."""
        if self._room is None:
            self._loop, self._room = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                if self._bytes < HIGH_WATER_BYTES:
                    return
                self._room.clear()
            await self._room.wait()

    def pulled(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def read(self, n: int) -> None:
        with self._lock:
            self._bytes -= n
            wake = self._room is not None and self._bytes < HIGH_WATER_BYTES
        if wake:
            self._loop.call_soon_threadsafe(self._room.set)


def bound_direct_ingress_receive(receive_class: type | None = None) -> bool:
    """Make Ray's direct-ingress `ASGIDIReceiveProxy` pull the next message from uvicorn only while
    less than HIGH_WATER_BYTES of body waits for the handler. Returns whether it is bounded."""
    if receive_class is None:
        try:
            from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy as receive_class
        except ImportError:
            log.warning("Ray has no ASGIDIReceiveProxy: direct-ingress request bodies are not back-pressured")
            return False
    if getattr(receive_class, "_bounded_body", False):
        return True
    probe = receive_class({"type": "http"}, None, None)
    if not (hasattr(probe, "_receive") and hasattr(receive_class, "_fetch_until_disconnect")):
        log.warning("Ray's ASGIDIReceiveProxy changed: direct-ingress request bodies are not back-pressured")
        return False
    init, call = receive_class.__init__, receive_class.__call__

    def bounded_init(self, scope, receive, user_event_loop) -> None:
        room = _BodyRoom()

        async def pull():
            await room.wait()
            message = await receive()
            room.pulled(_body_bytes(message))
            return message
        init(self, scope, pull, user_event_loop)
        self._body_room = room

    async def bounded_call(self):
        message = await call(self)
        self._body_room.read(_body_bytes(message))
        return message

    receive_class.__init__ = bounded_init
    receive_class.__call__ = bounded_call
    receive_class._bounded_body = True
    return True
