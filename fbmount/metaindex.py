"""Persistent metadata index: key + ETag → the object's x-amz-meta headers.

LIST carries no user metadata, so without this every `stat` after a listing would need a
HEAD to learn the s3fs mtime/mode. An entry is valid only while the ETag that LIST reports
is the one recorded, so a change behind the mount's back is noticed for free.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fbmount.index")


def _best_effort(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The index only saves HEADs: a full or broken cache disk must cost a HEAD, never the
    mount (an exception escaping here would end pyfuse3's main loop or the uploader)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as e:
            log.warning("metadata index: %s failed: %s", fn.__name__, e)
            return None

    return wrapper


def current_headers(row: tuple[str, str] | None, etag: str) -> dict[str, str] | None:
    """The headers of an index row (etag, headers JSON) if it describes version `etag`."""
    if row is None or row[0] != etag:
        return None
    return json.loads(row[1])


class MetaIndex:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, etag TEXT, headers TEXT)"
        )

    @_best_effort
    def get(self, key: str, etag: str) -> dict[str, str] | None:
        row = self._db.execute("SELECT etag, headers FROM meta WHERE key=?", (key,)).fetchone()
        return current_headers(row, etag)

    @_best_effort
    def under(self, prefix: str, limit: int) -> dict[str, tuple[str, str]] | None:
        """Every entry whose key starts with `prefix`: key -> (etag, headers JSON), in one
        range query where `get` per name of a big directory would be thousands. None if
        there are more than `limit` (keys deeper down count too: then ask per name)."""
        rows = self._db.execute(
            "SELECT key, etag, headers FROM meta WHERE key >= ? AND key < ? LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit + 1),
        ).fetchall()
        if len(rows) > limit:
            return None
        return {key: (etag, headers) for key, etag, headers in rows}

    @_best_effort
    def put(self, key: str, etag: str, headers: dict[str, str]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, etag, headers) VALUES (?, ?, ?)",
            (key, etag, json.dumps(headers, sort_keys=True)),
        )

    @_best_effort
    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM meta WHERE key=?", (key,))

    @_best_effort
    def rename_prefix(self, old: str, new: str) -> None:
        """Entries follow a renamed file/dir (its copies keep the same ETag on most servers)."""
        rows = self._db.execute(
            "SELECT key, etag, headers FROM meta WHERE key = ? OR substr(key, 1, ?) = ?",
            (old, len(old), old),
        ).fetchall()
        with self._db:
            for key, etag, headers in rows:
                self._db.execute("DELETE FROM meta WHERE key=?", (key,))
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)",
                    (new + key[len(old) :], etag, headers),
                )

    def close(self) -> None:
        self._db.close()
