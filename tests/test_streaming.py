"""Streaming uploads (fbmount/eager.py): parts go up while a big file is still being written.

Each test checks the object in S3 byte for byte and that no multipart upload is left open,
whatever happened to the file while it streamed (rewrite, rename, chmod, CopyObject refused,
kill -9).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from faultproxy import FaultProxy
from helpers import body, exists, open_uploads, wait_for

MiB = 1 << 20
PART = ("--part-size", "5")


def data_of(n: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(65536))
    return (block * (n // len(block) + 1))[:n]


def test_parts_go_up_before_close(s3: Any, bucket: str, mount: Callable, s3_endpoint: str):
    data = data_of(23 * MiB, 1)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, *PART, "--endpoint", proxy.endpoint)
        fd = os.open(m.path / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data[: 20 * MiB])
            # Still open: the first full parts are already uploading.
            wait_for(
                lambda: proxy.counts["UploadPart"] >= 2, "two parts sent before close", timeout=20
            )
            assert proxy.counts["CreateMultipartUpload"] == 1
            os.write(fd, data[20 * MiB :])
            os.fsync(fd)
        finally:
            os.close(fd)
        assert body(s3, bucket, "big.bin") == data
        assert proxy.counts["CreateMultipartUpload"] == 1  # one stream, no second upload
        assert proxy.counts["CopyObject"] == 0
        assert proxy.counts["PutObject"] == 0
        assert m.unmount() == 0
    assert open_uploads(s3, bucket) == []


def test_rewrite_below_sent_parts_abandons_the_stream(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str
):
    data = bytearray(data_of(18 * MiB, 2))
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, *PART, "--endpoint", proxy.endpoint)
        fd = os.open(m.path / "f.bin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            # Until a part has been stored (answered), so the rewrite is below a sent part.
            wait_for(
                lambda: any(r.kind == "UploadPart" and r.status == 200 for r in proxy.records),
                "a part stored",
                timeout=20,
            )
            os.pwrite(fd, b"REWRITTEN", 100)
            data[100:109] = b"REWRITTEN"
            os.fsync(fd)
        finally:
            os.close(fd)
        assert body(s3, bucket, "f.bin") == bytes(data)
        assert m.unmount() == 0
    assert open_uploads(s3, bucket) == []


def test_rename_and_chmod_while_streaming(s3: Any, bucket: str, mount: Callable, s3_endpoint: str):
    data = data_of(16 * MiB, 3)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, *PART, "--endpoint", proxy.endpoint)
        path = m.path / "draft.bin"
        path.write_bytes(data)
        os.chmod(path, 0o600)
        os.utime(path, (1_600_000_000, 1_600_000_000))
        os.rename(path, m.path / "final.bin")
        assert m.unmount() == 0
        copies = proxy.counts["CopyObject"]
    assert body(s3, bucket, "final.bin") == data
    meta = s3.head_object(Bucket=bucket, Key="final.bin")["Metadata"]
    assert meta["mode"] == str(0o100600) and meta["mtime"] == "1600000000"
    assert "draft.bin" not in [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    ]
    assert copies <= 1  # at most one server-side copy fixes key and metadata
    assert open_uploads(s3, bucket) == []


def test_copy_refused_falls_back_to_a_normal_upload(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str
):
    data = data_of(16 * MiB, 4)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.refuse_copy()
        m = mount(bucket, *PART, "--endpoint", proxy.endpoint)
        path = m.path / "a.bin"
        path.write_bytes(data)
        os.rename(path, m.path / "b.bin")
        assert m.unmount() == 0
    assert body(s3, bucket, "b.bin") == data
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "a.bin" not in keys
    assert open_uploads(s3, bucket) == []


def test_kill9_while_streaming_leaves_no_open_upload(s3: Any, bucket: str, mount: Callable):
    m = mount(bucket, *PART, "--upload-delay", "60")
    fd = os.open(m.path / "crash.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data_of(16 * MiB, 5))
    wait_for(lambda: len(open_uploads(s3, bucket)) == 1, "the stream's upload open", timeout=20)
    m.kill9()
    try:
        os.close(fd)  # its mount died with the daemon
    except OSError:
        pass
    again = mount(bucket, *PART, cache_dir=m.cache_dir, mountpoint=m.path)
    assert open_uploads(s3, bucket) == []  # the next mount aborted the stream
    assert again.unmount() == 0


def test_unmount_right_after_renaming_a_streamed_file_leaves_no_open_upload(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str
) -> None:
    """`mv` of a file whose parts are streaming abandons the stream, whose multipart
    upload is then aborted once its part in flight ends. An unmount right after used to
    cancel that abort when its flush was done (CI saw the upload left open): it waits
    for it now. The part is held until the final flush has stored the renamed file."""
    data = data_of(16 * MiB, 6)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, *PART, "--endpoint", proxy.endpoint)
        held = proxy.add_rule("UploadPart", "hold", key="/a.bin", times=1)
        fd = os.open(m.path / "a.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            assert held.wait_held(20), "no part of the stream was sent"
        finally:
            os.close(fd)
        os.rename(m.path / "a.bin", m.path / "b.bin")
        with ThreadPoolExecutor(1) as pool:
            unmounting = pool.submit(m.unmount)
            wait_for(lambda: exists(s3, bucket, "b.bin"), "b.bin stored by the final flush")
            time.sleep(0.5)  # the flush is over: only the abandoned stream's abort is left
            held.release()
            assert unmounting.result(timeout=120) == 0
    assert body(s3, bucket, "b.bin") == data
    assert open_uploads(s3, bucket) == []
