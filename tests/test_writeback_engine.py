"""The write-back engine below FUSE: staging + WriteBack + EagerUploads + S3Store, no mount.

Each test builds the layers the way fs.py does, against the session's real SeaweedFS behind
the fault proxy, and plays the filesystem's part itself (create, write, rename: the few
synchronous steps fs.py takes). The proxy's `hold` keeps one request until the test
releases it, so two operations happen in exactly the interleaving under test; the outcome
is checked in S3 with boto3. No kernel, no daemon: each test takes seconds.
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ACCESS_KEY, SECRET_KEY
from faultproxy import FaultProxy, Rule
from helpers import body, open_uploads

from fbmount.config import MIB, Config
from fbmount.credentials import Credentials
from fbmount.eager import EagerUploads
from fbmount.errors import FsError
from fbmount.metaindex import MetaIndex
from fbmount.namespace import Kind, Namespace, Node
from fbmount.staging import Staged, StagingArea, State
from fbmount.store import S3Store
from fbmount.tasks import open_nursery
from fbmount.uploader import WriteBack
from fbmount.uploadnotes import UploadNotes

PART = 5 * MIB  # the smallest part S3 allows: a stream starts after 2 parts written
BOUND = 30.0  # a condition not met after this long is a failure (a bound, not a timing)


def data_of(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Host:
    """The filesystem's side of the Protocols (eager.StreamHost, uploader.UploadHost)."""

    nursery: trio.Nursery | None = None
    stored_nodes: list[Node] = field(default_factory=list)

    def stored(self, node: Node) -> None:
        self.stored_nodes.append(node)


@dataclass
class Engine:
    """The layers below fs.py, wired as Filesystem.__init__ wires them."""

    cfg: Config
    store: S3Store
    staging: StagingArea
    ns: Namespace
    index: MetaIndex
    eager: EagerUploads
    wb: WriteBack
    host: Host

    # ----- the filesystem's few steps, as fs.py takes them ------------------------------
    def create(self, name: str) -> Staged:
        """fs.create: a new node and its staged file (DIRTY, no journal until close)."""
        node = self.ns.add(self.ns.root, name, Kind.FILE)
        node.remote = False
        node.mode = stat.S_IFREG | 0o644
        node.meta_known = True
        staged = self.staging.new(self.ns.key(node))
        staged.node, node.staged = node, staged
        staged.touch()  # a delete still queued for the name stays queued (delete_first)
        return staged

    def write(self, staged: Staged, data: bytes, off: int = 0) -> None:
        """fs.write: bytes into the staged copy, the change noted, the stream told."""
        node = staged.node
        written = os.pwrite(self.staging.open_fd(staged), data, off)
        node.size = max(node.size, off + written)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        staged.touch()
        self.eager.wrote(staged, node.name, off, off + written)

    def rename(self, staged: Staged, new_name: str, abandon: bool = True) -> None:
        """rename.Renamer._rename_staged without the journal: the stream bound to the old key is
        abandoned (abandon=False leaves it, to show finish() refuses it all the same),
        the name and the upload's key move in one step."""
        node = staged.node
        if abandon and staged.eager is not None:
            self.eager.abandon(staged, "renamed")
        staged.key = self.ns.child_key(self.ns.root, new_name, Kind.FILE)
        staged.touch()
        self.ns.move(node, self.ns.root, new_name)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def run_engine(
    proxy: FaultProxy, bucket: str, tmp_path: Path
) -> Callable[[Callable[[Engine], Awaitable[None]]], None]:
    """run_engine(body): build the engine against the proxy, run `await body(engine)` in
    trio with the host's nursery open (streams run there, as in the mount), then close."""

    def run(test_body: Callable[[Engine], Awaitable[None]], bodies: int = 0) -> None:
        """`bodies`: part bodies in flight at once (0: as the mount, --parallel + 2)."""
        cfg = Config(
            bucket=bucket,
            mountpoint=tmp_path / "mnt",
            endpoint=proxy.endpoint,
            provider="seaweedfs",
            upload_delay=0.2,
            part_size=PART,
            parallel=2,
            retries=1,  # a scripted failure is a failure, not a retry
            timeout=BOUND,
        )
        store = S3Store(
            bucket, proxy.endpoint, "us-east-1", Credentials(ACCESS_KEY, SECRET_KEY), retries=1
        )
        staging = StagingArea(tmp_path / "staging")
        store.upload_notes = UploadNotes(tmp_path / "multipart")
        ns = Namespace("", os.getuid(), os.getgid(), 0o022, 10.0, 10.0)
        index = MetaIndex(tmp_path / "meta.sqlite")
        host = Host()
        limiter = trio.CapacityLimiter(bodies or cfg.parallel + 2)
        eager = EagerUploads(store, cfg.part_size, limiter, host)
        wb = WriteBack(cfg, store, staging, ns, index, eager, host)
        engine = Engine(cfg, store, staging, ns, index, eager, wb, host)

        async def main() -> None:
            async with open_nursery() as nursery:
                host.nursery = nursery
                with trio.fail_after(4 * BOUND):  # a hang fails the test, never CI
                    await test_body(engine)
                nursery.cancel_scope.cancel()

        store.open()
        try:
            trio.run(main)
        finally:
            store.close()
            index.close()

    return run


async def held(rule: Rule) -> None:
    """Wait (in a worker thread: the proxy is threaded) until `rule` holds a request."""
    assert await trio.to_thread.run_sync(rule.wait_held, BOUND), "no request was held"


async def until(predicate: Callable[[], Any], what: str) -> None:
    """Wait for a condition, polling; fail after BOUND seconds."""
    with trio.move_on_after(BOUND):
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.05)
        return
    pytest.fail(f"not within {BOUND:.0f} s: {what}")


def kinds_for(proxy: FaultProxy, key: str) -> list[str]:
    """The S3 operations that reached the proxy for `key`, in order."""
    return [r.kind for r in proxy.records if r.path.endswith("/" + key)]


# ----- an upload in flight while the file is written again --------------------------------
@pytest.mark.parametrize("phase", ["request", "response"])
def test_write_during_upload_goes_up_after_it(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str, phase: str
) -> None:
    """The PUT of v1 is held (before S3 has it, or after, its answer not yet back) while v2
    is written. The upload of v1 ends as v1, whole; the file stays DIRTY (nothing retires
    it, v2 is not lost) and the engine, on its own, then uploads v2, whole."""
    v1, v2 = data_of(256 * 1024, "v1"), data_of(256 * 1024, "v2")

    async def scenario(e: Engine) -> None:
        staged = e.create("a.bin")
        e.write(staged, v1)
        hold = proxy.add_rule("PutObject", "hold", key="/a.bin", phase=phase, times=1)
        async with open_nursery() as nursery:
            nursery.start_soon(e.wb.upload, staged)
            await held(hold)
            assert staged.state is State.UPLOADING
            e.write(staged, v2)  # the write path takes no lock: it never waits for S3
            hold.release()
        assert body(s3, bucket, "a.bin") == v1, "the held upload must store v1, unmixed"
        assert staged.state is State.DIRTY, "changed during its upload: still to go up"
        assert staged.id in e.staging.entries and e.host.stored_nodes == []
        async with open_nursery() as nursery:
            nursery.start_soon(e.wb.run)
            await until(lambda: staged.id not in e.staging.entries, "v2 uploaded, retired")
            nursery.cancel_scope.cancel()
        assert staged.state is State.CLEAN and e.host.stored_nodes == [staged.node]
        assert body(s3, bucket, "a.bin") == v2
        assert kinds_for(proxy, "a.bin") == ["PutObject", "PutObject"]

    run_engine(scenario)


def test_multipart_upload_rewritten_between_parts_stores_no_mix(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    """A multipart upload of v1 reads each part from the staged file as it sends it. The
    answer to the first part sent is held (S3 has that part, v1) while the whole file is
    rewritten as v2; one body at a time, so the other parts are read after the rewrite.
    The raced upload must be aborted, not completed as parts of v1 and v2 (another client
    reading the object meanwhile would get bytes no one wrote), and v2 go up whole at once;
    no multipart upload is left open."""
    v1, v2 = data_of(2 * PART + MIB, "mp-v1"), data_of(2 * PART + MIB, "mp-v2")

    async def scenario(e: Engine) -> None:
        staged = e.create("mp.bin")
        e.write(staged, v1[PART:], PART)  # not front to back: no stream, a plain upload
        e.write(staged, v1[:PART], 0)
        assert staged.eager is None
        hold = proxy.add_rule("UploadPart", "hold", key="/mp.bin", phase="response", times=1)
        async with open_nursery() as nursery:
            nursery.start_soon(e.wb.upload, staged)
            await held(hold)
            e.write(staged, v2)
            hold.release()
        assert staged.state is State.CLEAN
        assert body(s3, bucket, "mp.bin") == v2, "S3 holds parts of v1 and parts of v2"
        assert proxy.counts["AbortMultipartUpload"] == 1
        assert proxy.counts["CompleteMultipartUpload"] == 1

    run_engine(scenario, bodies=1)
    assert not open_uploads(s3, bucket)


def test_file_changed_during_every_upload_still_gets_a_whole_version_stored(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    """A writer that keeps truncating and rewriting a file while its upload runs: the first
    upload is aborted (v1 changed to v2 under it), and the second sends a copy of v2 taken
    between two changes, so v3, written while that upload is held, cannot mix in or abort
    it. The crash soak saw `fbmount sync` give up on such a file ("the staged file
    shrank while being sent") although every change was the writer's own. v3 goes next."""
    v1, v2, v3 = (data_of(2 * PART + MIB, f"busy-v{i}") for i in (1, 2, 3))

    async def scenario(e: Engine) -> None:
        staged = e.create("busy.bin")
        e.write(staged, v1[PART:], PART)  # not front to back: no stream, a plain upload
        e.write(staged, v1[:PART], 0)
        first = proxy.add_rule("UploadPart", "hold", key="/busy.bin", phase="response", times=1)
        async with open_nursery() as nursery:
            nursery.start_soon(e.wb.upload, staged)
            await held(first)
            os.truncate(staged.data_path, 0)  # the writer truncates, then rewrites
            staged.touch()
            # The first upload made its one CreateMultipartUpload: this holds the second's.
            second = proxy.add_rule("CreateMultipartUpload", "hold", key="/busy.bin", times=1)
            e.write(staged, v2)
            first.release()
            await held(second)  # the first was aborted; the copy of v2 is about to be sent
            os.truncate(staged.data_path, MIB)
            staged.touch()
            e.write(staged, v3)
            second.release()
        assert body(s3, bucket, "busy.bin") == v2, "not v2 whole: a mix, or nothing"
        assert staged.state is State.DIRTY, "v3 is not stored yet: it must go up next"
        await e.wb.upload(staged)
        assert body(s3, bucket, "busy.bin") == v3
        assert staged.state is State.CLEAN
        assert not list(e.staging.root.glob("*.tmp")), "the copy was left behind"

    run_engine(scenario, bodies=1)
    assert not open_uploads(s3, bucket)


# ----- a streamed part held while the file is renamed ---------------------------------------
@pytest.mark.parametrize("abandon", [True, False], ids=["rename-abandons", "finish-refuses"])
def test_rename_during_streamed_part_completes_nothing_under_the_old_name(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str, abandon: bool
) -> None:
    """A file written front to back streams its parts to a multipart upload of its key.
    With one part held, the file is renamed and uploaded under the new name. The old key
    must get no object, no completion and no open upload once the held part is let go:
    `mv a b; echo hi > a` may give the old name to another file at any moment. With
    abandon=False the rename leaves the stream, and finish() itself must refuse it."""
    data = data_of(2 * PART + MIB, "streamed")

    async def scenario(e: Engine) -> None:
        hold = proxy.add_rule("UploadPart", "hold", key="/old.bin", times=1)
        staged = e.create("old.bin")
        staged.writers += 1  # open for writing: the settle scan leaves it alone
        for off in range(0, len(data), MIB):
            e.write(staged, data[off : off + MIB], off)
        assert staged.eager is not None, "two full parts written: a stream began"
        await held(hold)
        e.rename(staged, "new.bin", abandon=abandon)
        staged.writers -= 1
        await e.wb.upload(staged)  # the whole file, under the new name, part still held
        assert body(s3, bucket, "new.bin") == data
        hold.release()
        await until(lambda: not open_uploads(s3, bucket), "the old stream aborted")
        assert body(s3, bucket, "old.bin") is None
        old = kinds_for(proxy, "old.bin")
        assert "CompleteMultipartUpload" not in old and "PutObject" not in old, old
        assert "AbortMultipartUpload" in old, old
        assert "DeleteObject" not in old and "CopyObject" not in old, old
        assert staged.state is State.CLEAN

    run_engine(scenario)


# ----- a delete batch that fails -------------------------------------------------------------
def refuse_deletes(proxy: FaultProxy) -> tuple[Rule, Rule]:
    """The next DeleteObjects is held until released; it and every later one (botocore's
    retries too) are then refused with a 500, until the second rule is removed."""
    hold = proxy.add_rule("DeleteObjects", "hold", times=1)
    return hold, proxy.add_rule("DeleteObjects", "status", status=500)


async def flush_refused(wb: WriteBack, failures: list[FsError]) -> None:
    """Send the queued deletes; a refusal is noted in `failures`, not raised."""
    try:
        await wb.flush_deletes()
    except FsError as err:
        failures.append(err)


def test_failed_delete_batch_requeues_its_keys(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    """A DeleteObjects batch is held in flight, then refused. Meanwhile its keys count as
    deleted (listings hide them) and a key queued during the flight waits for the next
    batch. After the refusal every key is queued again and nothing left S3; sync's flush
    reports the unsent deletions; the next batch, allowed, deletes them all."""
    keys = [f"gone/{i}" for i in range(3)]

    async def scenario(e: Engine) -> None:
        for key in [*keys, "late"]:
            await e.store.put(key, b"x", {}, "application/octet-stream")
        hold, refuse = refuse_deletes(proxy)
        for key in keys:
            e.wb.queue_delete(key)
        failure: list[FsError] = []
        async with open_nursery() as nursery:
            nursery.start_soon(flush_refused, e.wb, failure)
            await held(hold)
            assert set(e.wb.deleting) == set(keys) and not e.wb.pending_deletes
            assert all(e.wb.is_deleted(k) for k in keys)
            e.wb.queue_delete("late")  # not in the batch in flight
            hold.release()
        assert failure, "the refused batch must raise"
        assert set(e.wb.pending_deletes) == {*keys, "late"} and not e.wb.deleting
        assert all(body(s3, bucket, k) == b"x" for k in [*keys, "late"])
        left = await e.wb.flush_all([])  # sync: the second refusal is reported, not lost
        assert [what for what, _ in left] == ["4 deletion(s)"], left
        assert set(e.wb.pending_deletes) == {*keys, "late"}
        proxy.remove_rule(refuse)
        await e.wb.flush_deletes()  # allowed now
        assert not e.wb.pending_deletes and not e.wb.deleting
        assert all(body(s3, bucket, k) is None for k in [*keys, "late"])

    run_engine(scenario)


def test_upload_waiting_for_a_failing_delete_of_its_key_sends_it_first(
    run_engine: Any, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    """`rm f` (batched), then a new `f` is written and uploaded while the batch deleting
    the old `f` is in flight, and that batch is refused. The upload waits for the batch,
    then sends the delete itself before its PUT; refused again, it sends no PUT and the
    file stays DIRTY. Allowed, the delete goes, then the PUT: the new `f` is never deleted
    by the old one's delete."""
    new = data_of(64 * 1024, "new")

    async def scenario(e: Engine) -> None:
        await e.store.put("f", b"old", {}, "application/octet-stream")
        puts = kinds_for(proxy, "f").count("PutObject")  # the old f's
        e.wb.queue_delete("f")
        hold, refuse = refuse_deletes(proxy)
        failure: list[FsError] = []
        upload_failure: list[FsError] = []

        async def upload(staged: Staged) -> None:
            try:
                await e.wb.upload(staged)
            except FsError as err:
                upload_failure.append(err)

        async with open_nursery() as nursery:
            nursery.start_soon(flush_refused, e.wb, failure)
            await held(hold)
            staged = e.create("f")
            e.write(staged, new)
            nursery.start_soon(upload, staged)
            await until(lambda: staged.state is State.UPLOADING, "the upload waits")
            hold.release()
        assert failure and upload_failure, "the batch and the upload's own delete refused"
        assert staged.state is State.DIRTY and body(s3, bucket, "f") == b"old"
        assert kinds_for(proxy, "f").count("PutObject") == puts, "a PUT before its delete"
        proxy.remove_rule(refuse)
        await e.wb.upload(staged)
        assert staged.state is State.CLEAN and body(s3, bucket, "f") == new
        kinds = [r.kind for r in proxy.records if r.kind in ("DeleteObjects", "PutObject")]
        assert kinds[-2:] == ["DeleteObjects", "PutObject"], kinds
        await e.wb.flush_deletes()
        assert not e.wb.pending_deletes and body(s3, bucket, "f") == new

    run_engine(scenario)
