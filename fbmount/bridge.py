"""Run aiobotocore (asyncio) from trio: an asyncio loop in its own thread.

Measured (docs/FIELD-NOTES, issue #2 note): this keeps ~90% of plain-asyncio request
rates and full ranged-GET throughput, where trio-asyncio halves GET throughput and the
httpx backend uploads ~10x slower. The trio side waits on a trio.Event set from the
asyncio thread through the trio token; a cancelled trio task cancels the asyncio task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
CANCEL_GRACE = 5.0


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
        """From trio: run fn(*args) as an asyncio task and await its result.

        On cancellation the asyncio task is cancelled and awaited (shielded, at most
        CANCEL_GRACE seconds) so that no request is still in flight when trio moves on; a
        cancelled PUT must not land after the DELETE that follows it (bench/bridge_compare).
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        state: dict[str, Any] = {}

        def wake(_: object = None) -> None:  # any thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def start() -> None:  # asyncio thread
            try:
                task = self.loop.create_task(fn(*args, **kwargs))  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 - handed to the trio side
                state["error"] = exc
                wake()
                return
            state["task"] = task
            task.add_done_callback(wake)

        def cancel() -> None:  # asyncio thread; call_soon_threadsafe is FIFO: after start()
            task = state.get("task")
            if task is not None:
                task.cancel()

        self.loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except BaseException:
            self.loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(deadline=trio.current_time() + CANCEL_GRACE, shield=True):
                await done.wait()
            raise
        if "error" in state:
            raise state["error"]
        return state["task"].result()

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
