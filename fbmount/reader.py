"""Reading remote objects: ranged GETs, sequential read-ahead that grows, exact random reads.

The kernel asks for 128 KiB at a time, so one GET per kernel read would cap throughput at
one round trip per 128 KiB. A sequential reader instead keeps a window of `chunk`-sized
GETs in flight ahead of it, growing from one chunk to `read_ahead`; a read that does not
follow the previous one fetches exactly the bytes asked for (one GET per miss). Every GET
carries If-Match with the ETag seen at open, so a reader never mixes bytes of two versions.
Memory per reader is bounded by the window.

Random reads cost a round trip each: 30 ms apiece on a far link, where fetching the whole
object once and reading it locally (what s3fs always does) wins after a few dozen. The
reader cannot know how many will follow, so it rents until renting has cost a fair share of
buying (`wants_whole_copy`); the caller then fetches the object to local disk.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from fbmount.errors import FsError
from fbmount.store import S3Store

CHUNK = 8 * 1024 * 1024
# A whole object is fetched as parallel 8 MiB GETs at about this rate or better (the far-link
# benchmark reads 110-150 MB/s; loopback 300-400).
WHOLE_COPY_BYTES_PER_S = 100e6
# Random GETs have waited this share of the whole fetch's estimated time: buy. A reader that
# stops right after has paid at most (1 + 1/share) times the cheaper choice.
WHOLE_COPY_AFTER_SHARE = 0.25
# ... but only where a round trip is what random reads pay for: on loopback or a LAN a GET
# of 4 KiB costs a millisecond or two, and moving the whole object through the daemon costs
# more CPU than the reads it saves (measured: 300 random reads in 128 MiB, 580 -> 360/s).
WHOLE_COPY_MIN_LATENCY = 0.010


class MemoryBudget:
    """Read-ahead memory shared by every open file: prefetch only what the budget allows.

    A chunk that a read is waiting for is always fetched (at most one per concurrent
    read); chunks fetched ahead of the reader need a token, so N readers cannot hold more
    than `limit` bytes of prefetched data between them.
    """

    def __init__(self, limit: int, chunk: int = CHUNK) -> None:
        self.tokens = max(1, limit // chunk)
        self.used = 0

    def try_take(self) -> bool:
        if self.used >= self.tokens:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        self.used = max(0, self.used - 1)


class _Chunk:
    __slots__ = ("data", "done", "error", "budgeted")

    def __init__(self, budgeted: bool = False) -> None:
        self.data = b""
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.budgeted = budgeted


class RemoteReader:
    """Per-open-file reader of one object version."""

    def __init__(
        self,
        store: S3Store,
        key: str,
        size: int,
        etag: str | None,
        read_ahead: int,
        spawn: Callable,
        limiter: trio.CapacityLimiter,
        budget: MemoryBudget,
        chunk: int = CHUNK,
    ) -> None:
        self.store, self.key, self.size, self.etag = store, key, size, etag
        self.chunk = chunk
        self.max_window = max(1, read_ahead // chunk)
        self.window = 1
        self.spawn = spawn  # nursery.start_soon of the daemon: prefetch outlives one read()
        self.limiter = limiter
        self.budget = budget
        self.chunks: dict[int, _Chunk] = {}
        self.next_offset = 0
        self.streak = 0
        self.random_wait = 0.0  # seconds spent waiting for exact (random) GETs
        self.random_gets = 0
        self.closed = False

    @property
    def wants_whole_copy(self) -> bool:
        """Random reads on a far link have waited long enough that a local copy is the
        cheaper way on."""
        return (
            self.random_gets >= 4
            and self.random_wait >= WHOLE_COPY_MIN_LATENCY * self.random_gets
            and self.random_wait >= WHOLE_COPY_AFTER_SHARE * self.size / WHOLE_COPY_BYTES_PER_S
        )

    async def read(self, off: int, size: int) -> bytes | memoryview:
        """The bytes [off, off + size): a view into the fetched chunk where they lie in one
        (pyfuse3 replies from any buffer, so 128 MiB read costs no 128 MiB copy)."""
        if off >= self.size or size <= 0:
            return b""
        end = min(off + size, self.size)
        sequential = off == self.next_offset or (off // self.chunk) in self.chunks
        self.next_offset = end
        if not sequential:
            self.streak = 0
            self.window = 1
            started = trio.current_time()
            try:
                return await self.store.get_range(self.key, off, end, self.etag)
            finally:
                self.random_wait += trio.current_time() - started
                self.random_gets += 1
        self.streak += 1
        first, last = off // self.chunk, (end - 1) // self.chunk
        if self.streak > 1 and self.window < self.max_window and off % self.chunk < size:
            self.window = min(self.max_window, self.window * 2)  # grow at chunk boundaries
        self._prefetch(first, last, needed=True)
        self._prefetch(last + 1, last + self.window, needed=False)
        for idx in [i for i in self.chunks if i < first - 1]:
            self._drop(idx)  # well behind the reader: free the memory
        parts = []
        for idx in range(first, last + 1):
            chunk = self.chunks.get(idx)
            if chunk is None:  # the kernel's concurrent read-ahead dropped it meanwhile
                self._prefetch(idx, idx, needed=True)
                chunk = self.chunks[idx]
            await chunk.done.wait()
            if chunk.error is not None:
                self._drop(idx)
                raise chunk.error
            base = idx * self.chunk
            view = memoryview(chunk.data)
            parts.append(view[max(off, base) - base : min(end, base + self.chunk) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _prefetch(self, first: int, last: int, needed: bool) -> None:
        last = min(last, (self.size - 1) // self.chunk)
        for idx in range(first, last + 1):
            if idx in self.chunks:
                continue
            budgeted = False
            if not needed:
                if not self.budget.try_take():
                    return  # over the shared budget: read-ahead waits for memory
                budgeted = True
            chunk = self.chunks[idx] = _Chunk(budgeted)
            self.spawn(self._fetch, idx, chunk)

    def _drop(self, idx: int) -> None:
        chunk = self.chunks.pop(idx, None)
        if chunk is not None and chunk.budgeted:
            chunk.budgeted = False
            self.budget.give_back()

    async def _fetch(self, idx: int, chunk: _Chunk) -> None:
        try:
            if self.closed:
                raise FsError(5, "reader closed")
            async with self.limiter:
                start = idx * self.chunk
                chunk.data = await self.store.get_range(
                    self.key, start, min(start + self.chunk, self.size), self.etag
                )
        except FsError as e:
            chunk.error = e
        except trio.Cancelled:
            chunk.error = FsError(5, "unmounting")
            raise
        finally:
            chunk.done.set()

    def close(self) -> None:
        self.closed = True
        for idx in list(self.chunks):
            self._drop(idx)
