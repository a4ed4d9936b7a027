"""Per-key rate limit shared by every ingress replica: a sliding 60-second window.

A key may make at most `limit` calls in any 60 seconds. The counts live in one small named
Ray actor, so two ingress replicas see the same budget (a per-process counter would hand out
`limit` per replica).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # unix seconds when the oldest call in the window leaves it (a slot frees)
    retry_after_s: int  # 0 when allowed

    def headers(self) -> dict[str, str]:
        headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                   "X-RateLimit-Reset": str(self.reset_at)}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class SlidingWindow:
    """Exact sliding-window log: the times of each key's calls in the last WINDOW_S seconds."""

    def __init__(self) -> None:
        self._calls: dict[str, deque[float]] = {}

    def hit(self, key: str, limit: int, now: float) -> Decision:
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now - WINDOW_S:
            calls.popleft()
        # A lowered limit leaves extra entries; they age out like the others.
        allowed = len(calls) < limit
        if allowed:
            calls.append(now)
        oldest = calls[0] if calls else now
        free_at = oldest + WINDOW_S
        return Decision(allowed=allowed, limit=limit, remaining=max(0, limit - len(calls)),
                        reset_at=math.ceil(free_at),
                        retry_after_s=0 if allowed else max(1, math.ceil(free_at - now)))

    def forget_idle(self, now: float) -> None:
        for key in [k for k, calls in self._calls.items() if not calls or calls[-1] <= now - WINDOW_S]:
            del self._calls[key]


class RateLimiter:
    """The shared counter (a named, detached Ray actor; see `deployments.jobs.get_or_create`)."""

    def __init__(self) -> None:
        self._window = SlidingWindow()
        self._hits = 0

    async def hit(self, key: str, limit: int) -> Decision:
        now = time.time()
        self._hits += 1
        if self._hits % 10_000 == 0:
            self._window.forget_idle(now)
        return self._window.hit(key, limit, now)
