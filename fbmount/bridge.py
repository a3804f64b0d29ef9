"""Run aiobotocore (asyncio) from trio: an asyncio loop in its own thread.

Measured (docs/FIELD-NOTES, issue #2 note): this keeps ~90% of plain-asyncio request
rates and full ranged-GET throughput, where trio-asyncio halves GET throughput and the
httpx backend uploads ~10x slower. The trio side waits on a trio.Event set from the
asyncio thread through the trio token; a cancelled trio task cancels the asyncio task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fbmount-asyncio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call_blocking(self, fn: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """From a plain thread (start-up, shutdown): run a coroutine and wait."""
        return self.submit(fn()).result(timeout)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """From trio: run fn(*args) on the asyncio loop and await its result."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self.submit(fn(*args, **kwargs))

        def wake(_: concurrent.futures.Future) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()  # cancels the asyncio task too
            raise
        return future.result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(_cancel_all()).result(5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
