"""Nurseries and background tasks that no bug can turn into a dead mount.

trio >= 0.25 wraps every exception leaving a nursery in an ExceptionGroup (strict groups),
so `except FsError` around a nursery would miss a failed part upload and the group would
travel up and end the daemon. `open_nursery` hands callers the one error that matters;
`guarded` runs a background task that logs an unexpected exception, reports it, and
returns instead of cancelling its siblings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from fbmount.errors import FsError

log = logging.getLogger("fbmount.tasks")


def collapse(group: BaseExceptionGroup) -> BaseException:
    """The one exception a caller should see from a nursery's group.

    Ctrl-C or exit first, then the first real error (an FsError before a bug, so an errno
    reaches the caller), and the group itself when it holds only trio.Cancelled: the cancel
    scope that caused it must see every Cancelled to absorb them.
    """
    leaves = list(_leaves(group))
    for kinds in ((KeyboardInterrupt, SystemExit), (FsError,), (Exception,)):
        for leaf in leaves:
            if isinstance(leaf, kinds):
                return leaf
    return group


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """trio.open_nursery() that raises the single error that matters, not a group."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        one = collapse(group)
        if one is group:
            raise
        raise one from None


def describe(e: BaseException) -> str:
    """One line for the log and `fbmount status`: the errno sentence, or the bug's type."""
    if isinstance(e, FsError):
        return e.message
    return f"internal error: {type(e).__name__}: {e}"


async def guarded(
    what: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    on_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Run a background task; an exception is logged with its traceback and reported to
    `on_error` (which marks the file failed and schedules the retry), never raised."""
    try:
        await fn(*args)
    except trio.Cancelled:
        raise
    except Exception as e:  # noqa: BLE001 - the point: a bug costs one task, not the mount
        if isinstance(e, FsError):
            log.error("%s failed: %s", what, describe(e))
        else:
            log.exception("%s failed unexpectedly (a bug; the mount goes on)", what)
        if on_error is not None:
            try:
                on_error(e)
            except Exception:  # noqa: BLE001
                log.exception("reporting the failure of %s failed", what)
