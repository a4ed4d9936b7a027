"""The conversion replicas' cache of inputs' features and f0 tracks (deployments/input_cache.py)."""
import asyncio

import numpy as np
import pytest

from deployments.input_cache import InputCache


class Stage:
    """A model stage stand-in: counts its computations, each held until `release` is set."""

    def __init__(self, nbytes: int = 400) -> None:
        self.calls = 0
        self.nbytes = nbytes
        self.release = asyncio.Event()
        self.release.set()

    async def compute(self, fail: bool = False) -> np.ndarray:
        self.calls += 1
        await self.release.wait()
        if fail:
            raise RuntimeError("replica died")
        return np.full(self.nbytes // 4, self.calls, dtype=np.float32)


def test_a_kept_input_is_not_computed_again_and_cannot_be_changed():
    async def main():
        cache, stage = InputCache(10_000), Stage()
        first, spared_first = await cache.get("a", stage.compute)
        again, spared_again = await cache.get("a", stage.compute)
        other, _ = await cache.get("b", stage.compute)
        return stage.calls, first, spared_first, again, spared_again, other

    calls, first, spared_first, again, spared_again, other = asyncio.run(main())
    assert calls == 2 and not spared_first and spared_again
    assert again is first and other[0] == 2
    with pytest.raises(ValueError):
        again[0] = 0  # every later job gets this very array


def test_jobs_asking_at_once_share_one_computation():
    async def main():
        cache, stage = InputCache(10_000), Stage()
        stage.release.clear()
        jobs = [asyncio.ensure_future(cache.get("a", stage.compute)) for _ in range(3)]
        await asyncio.sleep(0.01)
        stage.release.set()
        return stage.calls, await asyncio.gather(*jobs)

    calls, results = asyncio.run(main())
    assert calls == 1
    assert [spared for _, spared in results] == [False, True, True]
    assert results[1][0] is results[0][0]


def test_a_cancelled_job_leaves_the_others_computation_running():
    async def main():
        cache, stage = InputCache(10_000), Stage()
        stage.release.clear()
        first = asyncio.ensure_future(cache.get("a", stage.compute))
        second = asyncio.ensure_future(cache.get("a", stage.compute))
        await asyncio.sleep(0.01)
        first.cancel()  # the job that started the computation goes away
        await asyncio.sleep(0.01)
        stage.release.set()
        return stage.calls, first.cancelled(), await second

    calls, first_cancelled, (array, spared) = asyncio.run(main())
    assert calls == 1 and first_cancelled and spared and array[0] == 1


def test_a_computation_nobody_waits_for_is_cancelled_and_the_next_job_computes_afresh():
    async def main():
        cache = InputCache(10_000)
        cancelled = asyncio.Event()

        async def stuck() -> np.ndarray:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return np.zeros(1, dtype=np.float32)

        job = asyncio.ensure_future(cache.get("a", stuck))
        await asyncio.sleep(0.01)
        job.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)
        return await cache.get("a", Stage().compute)

    array, spared = asyncio.run(main())
    assert not spared and array[0] == 1


def test_a_failed_computation_fails_its_waiters_and_is_not_kept():
    async def main():
        cache, stage = InputCache(10_000), Stage()
        stage.release.clear()
        jobs = [asyncio.ensure_future(cache.get("a", lambda: stage.compute(fail=True))) for _ in range(2)]
        await asyncio.sleep(0.01)
        stage.release.set()
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        return outcomes, await cache.get("a", stage.compute), stage.calls

    outcomes, (array, spared), calls = asyncio.run(main())
    assert [str(o) for o in outcomes] == ["replica died", "replica died"]
    assert not spared and calls == 2 and array[0] == 2


def test_the_least_recently_used_go_first_within_the_byte_bound():
    async def main():
        cache, stage = InputCache(1_000), Stage(nbytes=400)
        for key in ("a", "b"):
            await cache.get(key, stage.compute)
        await cache.get("a", stage.compute)  # a is now the more recent
        await cache.get("c", stage.compute)  # 1,200 bytes: b goes
        held = cache.held_bytes
        spared = {key: (await cache.get(key, Stage().compute))[1] for key in ("a", "c", "b")}
        big = Stage(nbytes=2_000)
        await cache.get("big", big.compute)
        await cache.get("big", big.compute)  # larger than the whole cache: never kept
        off, off_stage = InputCache(0), Stage()
        await off.get("a", off_stage.compute)
        await off.get("a", off_stage.compute)
        return held, spared, big.calls, off_stage.calls

    held, spared, big_calls, off_calls = asyncio.run(main())
    assert held == 800
    assert spared == {"a": True, "c": True, "b": False}
    assert big_calls == 2 and off_calls == 2
