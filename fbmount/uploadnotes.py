"""Crash notes for multipart uploads: kill -9 never leaves one open in the bucket.

An open multipart upload is invisible in listings but its parts are stored (and billed)
until someone aborts it. Every CreateMultipartUpload the store sends is noted first in
`<state dir>/multipart/<random>.json` (key, time, and the UploadId once known) and the note is
removed when the upload is completed or aborted. The next mount of the bucket aborts what
the notes name; a note without an UploadId (the crash came while the create was in
flight) aborts the uploads of that key begun since the note was written.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fbmount.errors import FsError

log = logging.getLogger("fbmount.uploadnotes")
CLOCK_SLACK = 300.0  # seconds: a server clock behind ours must not hide an upload


class UploadNotes:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._by_upload: dict[str, Path] = {}

    def begin(self, key: str) -> Path:
        """Note an upload about to be created; returns the note to pass to `created`."""
        path = self.dir / f"{secrets.token_hex(8)}.json"
        self._write(path, {"key": key, "upload_id": None, "since": time.time() - CLOCK_SLACK})
        return path

    def created(self, note: Path, key: str, upload_id: str) -> None:
        self._write(note, {"key": key, "upload_id": upload_id, "since": time.time()})
        self._by_upload[upload_id] = note

    def discard(self, note: Path) -> None:
        """The create failed: nothing was started (or retries will say so)."""
        note.unlink(missing_ok=True)

    def ended(self, upload_id: str) -> None:
        """Completed or aborted: nothing left open."""
        note = self._by_upload.pop(upload_id, None)
        if note is not None:
            note.unlink(missing_ok=True)

    @staticmethod
    def _write(path: Path, note: dict) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(note).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    async def abort_leftovers(
        self,
        abort: Callable[[str, str], Awaitable[None]],
        uploads_of: Callable[[str, float], Awaitable[list[str]]],
    ) -> int:
        """At mount, before any new upload: abort what a crashed run left open.

        `uploads_of(key, since)` lists the UploadIds of `key` begun since `since`. A note
        whose abort fails stays for the next mount. Returns how many uploads were aborted."""
        aborted = 0
        for path in sorted(self.dir.glob("*.json")):
            try:
                note = json.loads(path.read_text())
                key = note["key"]
                ids = [note["upload_id"]] if note.get("upload_id") else []
                if not ids:
                    ids = await uploads_of(key, float(note.get("since", 0)))
                for upload_id in ids:
                    await abort(key, upload_id)
                    aborted += 1
            except (OSError, ValueError, KeyError, FsError) as e:
                log.error(
                    "could not abort a multipart upload left by the last run (%s): %s",
                    path.name,
                    getattr(e, "message", e),
                )
                continue
            path.unlink(missing_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if aborted:
            log.info("aborted %d multipart upload(s) left open by the last run", aborted)
        return aborted
