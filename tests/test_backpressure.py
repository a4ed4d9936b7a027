"""The bounded body queues of deployments/backpressure.py on Ray Serve's own queue classes
(subclasses, so that this process's Ray stays as it is), driven directly with asyncio."""
from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator

import pytest
from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy
from ray.serve._private.http_util import ASGIReceiveProxy, MessageQueue

from deployments.backpressure import (HIGH_WATER_BYTES, bound_direct_ingress_receive, bound_proxy_receive,
                                      bound_replica_receive)

CHUNK = 64 * 1024  # what uvicorn hands over per read


def _body(n: int = CHUNK, more: bool = True) -> dict:
    return {"type": "http.request", "body": bytes(n), "more_body": more}


def _bounded_proxy_queue() -> MessageQueue:
    queue_class = type("ProxyQueue", (MessageQueue,), {})
    assert bound_proxy_receive(queue_class)
    return queue_class()


async def _full_proxy_queue() -> tuple[MessageQueue, asyncio.Task]:
    """A bounded proxy queue holding the high-water mark of body, and the put after it, which
    waits (asserted)."""
    queue = _bounded_proxy_queue()
    for _ in range(HIGH_WATER_BYTES // CHUNK):
        await queue(_body())
    blocked = asyncio.create_task(queue(_body()))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    return queue, blocked


def test_the_proxy_stops_reading_the_client_at_the_high_water_mark():
    async def run():
        queue = _bounded_proxy_queue()
        put = 0

        async def read_client():  # what the proxy's proxy_asgi_receive does with each client message
            nonlocal put
            for _ in range(100):
                await queue(_body())
                put += 1
        reader = asyncio.create_task(read_client())
        await asyncio.sleep(0.05)
        assert put == HIGH_WATER_BYTES // CHUNK  # blocked: the replica has pulled nothing
        pulled = queue.get_messages_nowait()  # one pull by the replica
        assert len(pulled) == put
        await asyncio.sleep(0.05)
        assert put == 2 * HIGH_WATER_BYTES // CHUNK
        while not reader.done():
            await queue.wait_for_message()
            queue.get_messages_nowait()
            await asyncio.sleep(0)
        assert put == 100
    asyncio.run(run())


def test_a_closed_proxy_queue_wakes_its_blocked_reader():
    async def run():
        queue, blocked = await _full_proxy_queue()
        queue.close()  # the request ended: Ray closes the queue
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(blocked, 1)
    asyncio.run(run())


def test_the_proxy_queue_passes_other_messages_whatever_it_holds():
    async def run():
        queue = _bounded_proxy_queue()
        for _ in range(HIGH_WATER_BYTES // CHUNK):
            await queue(_body())
        await asyncio.wait_for(queue({"type": "http.disconnect"}), 1)
        await asyncio.wait_for(queue({"type": "http.request", "body": b"", "more_body": False}), 1)
        assert len(queue.get_messages_nowait()) == HIGH_WATER_BYTES // CHUNK + 2
    asyncio.run(run())


class _Proxy:
    """The proxy end of a request as the replica sees it: each pull returns the next batch."""

    def __init__(self, batches: int, batch_bytes: int) -> None:
        self.left, self.batch_bytes, self.pulls = batches, batch_bytes, 0

    async def receive_asgi_messages(self, _metadata) -> bytes:
        self.pulls += 1
        self.left -= 1
        return pickle.dumps([_body(self.batch_bytes, more=self.left > 0)] if self.left >= 0
                            else [{"type": "http.disconnect"}])


def test_the_replica_pulls_only_while_the_handler_keeps_up():
    async def run():
        receive_class = type("ReplicaReceive", (ASGIReceiveProxy,), {})
        assert bound_replica_receive(receive_class)
        proxy = _Proxy(batches=40, batch_bytes=HIGH_WATER_BYTES // 4)
        receive = receive_class({"type": "http"}, None, proxy.receive_asgi_messages)
        fetch = asyncio.create_task(receive.fetch_until_disconnect())
        await asyncio.sleep(0.05)
        assert proxy.pulls == 4  # 4 batches fill the queue: the next pull waits for the handler
        got = 0
        while True:  # the handler reads: the pulls follow
            message = await asyncio.wait_for(receive(), 1)
            got += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        assert got == 40 * HIGH_WATER_BYTES // 4
        await asyncio.wait_for(fetch, 1)
        assert proxy.pulls == 41
    asyncio.run(run())


def test_an_unbounded_receive_pulls_everything():
    """The behaviour bounded above, on Ray's class as it ships (so the test above can fail)."""
    async def run():
        proxy = _Proxy(batches=40, batch_bytes=HIGH_WATER_BYTES // 4)
        receive = ASGIReceiveProxy({"type": "http"}, None, proxy.receive_asgi_messages)
        fetch = asyncio.create_task(receive.fetch_until_disconnect())
        await asyncio.wait_for(fetch, 1)
        assert proxy.pulls == 41
    asyncio.run(run())


def test_the_proxy_count_follows_messages_taken_one_at_a_time():
    async def run():
        queue, blocked = await _full_proxy_queue()
        await queue.get_one_message()  # one chunk's room
        await asyncio.wait_for(blocked, 1)
        assert len(queue.get_messages_nowait()) == HIGH_WATER_BYTES // CHUNK
    asyncio.run(run())


class _Uvicorn:
    """uvicorn's `receive` for one request of `chunks` body messages, then the disconnect."""

    def __init__(self, chunks: int) -> None:
        self.left, self.pulls = chunks, 0

    async def receive(self) -> dict:
        self.pulls += 1
        self.left -= 1
        return _body(more=self.left > 0) if self.left >= 0 else {"type": "http.disconnect"}


@pytest.fixture
def user_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The user code's event loop, in a thread of its own (Serve's default for replicas)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def _direct_ingress_request(receive_class: type, user_loop, chunks: int) -> tuple[int, int, int]:
    """(pulls before the handler read anything, body bytes the handler read, pulls in all).
    `user_loop` None: the user code runs in Serve's own loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)."""
    uvicorn = _Uvicorn(chunks)
    receive = receive_class({"type": "http"}, uvicorn.receive, user_loop or asyncio.get_running_loop())
    fetch = receive.fetch_until_disconnect_task()
    await asyncio.sleep(0.1)
    pulled_unread = uvicorn.pulls

    async def handler() -> int:  # reads the body in the user's loop, as Starlette's request.stream()
        got = 0
        while True:
            message = await asyncio.wait_for(receive(), 2)
            got += len(message.get("body", b""))
            if not message.get("more_body"):
                return got
    got = await (handler() if user_loop is None
                 else asyncio.wrap_future(asyncio.run_coroutine_threadsafe(handler(), user_loop)))
    await asyncio.wait_for(fetch, 2)
    return pulled_unread, got, uvicorn.pulls


@pytest.mark.parametrize("separate_thread", [True, False])
def test_direct_ingress_pulls_only_while_the_handler_keeps_up(user_loop, separate_thread):
    receive_class = type("DirectIngressReceive", (ASGIDIReceiveProxy,), {})
    assert bound_direct_ingress_receive(receive_class)
    unread, got, pulls = asyncio.run(_direct_ingress_request(receive_class, user_loop if separate_thread else None,
                                                             100))
    assert unread == HIGH_WATER_BYTES // CHUNK  # full: uvicorn is not read (its socket neither)
    assert (got, pulls) == (100 * CHUNK, 101)  # the whole body, then the disconnect


def test_an_unbounded_direct_ingress_receive_pulls_everything(user_loop):
    """The behaviour bounded above, on Ray's class as it ships (so the test above can fail)."""
    unread, got, pulls = asyncio.run(_direct_ingress_request(ASGIDIReceiveProxy, user_loop, 100))
    assert (unread, got, pulls) == (101, 100 * CHUNK, 101)
