"""The bounded body queues of deployments/backpressure.py on Ray Serve's own queue classes
(subclasses, so that this process's Ray stays as it is), driven directly with asyncio."""
from __future__ import annotations

import asyncio
import pickle

import pytest
from ray.serve._private.http_util import ASGIReceiveProxy, MessageQueue

from deployments.backpressure import HIGH_WATER_BYTES, bound_proxy_receive, bound_replica_receive

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
