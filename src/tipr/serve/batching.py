"""Dynamic batching: items of concurrent requests encoded in one model call.

A request awaits :meth:`MicroBatcher.submit` with its items (a few queries, an
image). One task takes the first waiting request, then keeps taking more for
at most ``max_wait_s`` or until ``max_items`` items are gathered, and runs
``fn`` on all of them in a worker thread (the event loop keeps accepting
requests meanwhile); each request gets its own slice of the results. An error
in ``fn`` fails the requests of that batch only; the batcher goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """Batch the items of concurrent :meth:`submit` calls into calls of ``fn(items) -> results`` (same length)."""

    def __init__(self, fn: Callable[[list], Sequence], *, max_items: int = 32, max_wait_s: float = 0.005):
        if max_items < 1 or max_wait_s < 0:
            raise ValueError(f"max_items must be >= 1 and max_wait_s >= 0, got {max_items} and {max_wait_s}")
        self.fn, self.max_items, self.max_wait_s = fn, max_items, max_wait_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.calls = self.items = 0  # model calls made and items encoded: items / calls is the mean batch

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def submit(self, items: list) -> list:
        """The results of ``items``, computed together with those of other waiting requests."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count, deadline = len(batch[0][0]), loop.time() + self.max_wait_s
            while count < self.max_items and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                count += len(batch[-1][0])
            items: list[Any] = [item for request, _ in batch for item in request]
            try:
                results = await asyncio.to_thread(self.fn, items)
            except Exception as e:  # this batch's requests fail; the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.calls, self.items = self.calls + 1, self.items + len(items)
            start = 0
            for request, future in batch:
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(results[start:start + len(request)])
                start += len(request)
