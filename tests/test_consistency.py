"""The two consistency contracts (README, Semantics): `--consistency strict` is s3fs's
(an object in S3 when close() returns, a change made elsewhere seen at the next stat);
the default is write-back, and a second mount sees a new file in a listing within about
a second of its upload instead of after the listing TTL."""

from __future__ import annotations

import os
import time
from typing import Any

from faultproxy import FaultProxy
from helpers import body, wait_for


def test_strict_uploads_at_close_and_sees_changes_at_the_next_stat(
    s3: Any, bucket: str, mount: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="other.txt", Body=b"12345")
    m = mount(bucket, "--consistency", "strict")
    assert os.stat(m.path / "other.txt").st_size == 5

    with open(m.path / "mine.txt", "wb") as f:
        f.write(b"written here")
    assert body(s3, bucket, "mine.txt") == b"written here"  # close() returned: in S3

    s3.put_object(Bucket=bucket, Key="other.txt", Body=b"changed elsewhere, longer")
    assert os.stat(m.path / "other.txt").st_size == 25  # the very next stat
    assert (m.path / "other.txt").read_bytes() == b"changed elsewhere, longer"

    assert "new.txt" not in os.listdir(m.path)
    s3.put_object(Bucket=bucket, Key="new.txt", Body=b"n")
    wait_for(lambda: (m.path / "new.txt").exists(), "new.txt seen", timeout=3.0)  # listing <= 1 s
    assert m.unmount() == 0


def test_second_mount_lists_a_new_file_within_seconds(s3: Any, bucket: str, mount: Any) -> None:
    """Default mode: the writer's upload after 2 s, then the reader's next `ls` re-lists a
    directory whose listing is older than a second (--dir-ttl is 10 s)."""
    writer = mount(bucket)
    reader = mount(bucket)
    os.mkdir(writer.path / "shared")
    wait_for(lambda: os.path.isdir(reader.path / "shared"), "shared/ seen", timeout=5.0)
    assert os.listdir(reader.path / "shared") == []  # the reader caches this listing
    start = time.monotonic()
    (writer.path / "shared" / "hello.txt").write_bytes(b"hello")
    wait_for(
        lambda: "hello.txt" in os.listdir(reader.path / "shared"), "hello.txt listed", timeout=5.0
    )
    print(f"listed on the second mount after {time.monotonic() - start:.1f} s")
    assert (reader.path / "shared" / "hello.txt").read_bytes() == b"hello"
    assert writer.unmount() == 0
    assert reader.unmount() == 0


def test_strict_sees_a_name_created_elsewhere_at_the_next_lookup(
    s3: Any, bucket: str, mount: Any
) -> None:
    """s3fs's contract: a name another client just created is there at the next lookup,
    even in a directory this mount has just listed and just looked the name up in."""
    m = mount(bucket, "--consistency", "strict")
    os.mkdir(m.path / "d")
    assert os.listdir(m.path / "d") == []  # the listing is cached now
    assert not (m.path / "d" / "new.txt").exists()  # and the name was looked up: absent
    s3.put_object(Bucket=bucket, Key="d/new.txt", Body=b"n")
    assert (m.path / "d" / "new.txt").read_bytes() == b"n"
    assert not (m.path / "d" / "sub").exists()
    s3.put_object(Bucket=bucket, Key="d/sub/", Body=b"", ContentType="application/x-directory")
    assert os.path.isdir(m.path / "d" / "sub")
    assert sorted(os.listdir(m.path / "d")) == ["new.txt", "sub"]
    assert m.unmount() == 0


def test_default_mode_finds_a_name_stored_elsewhere_within_a_second(
    s3: Any, bucket: str, mount: Any
) -> None:
    """Default mode: a lookup of a name missing from a cached listing (--dir-ttl 10 s) re-lists
    the directory once the listing is a quarter of a second old, so a file another client
    stored is there by name at once, not 10 s later; `ls` is not needed for it."""
    m = mount(bucket)
    os.mkdir(m.path / "d")
    assert os.listdir(m.path / "d") == []  # the listing is cached now
    assert not (m.path / "d" / "new.txt").exists()  # and the name was looked up: absent
    s3.put_object(Bucket=bucket, Key="d/new.txt", Body=b"n")
    s3.put_object(Bucket=bucket, Key="d/sub/f", Body=b"f")
    start = time.monotonic()
    wait_for(lambda: (m.path / "d" / "new.txt").exists(), "new.txt found", timeout=1.5)
    print(f"found by name after {time.monotonic() - start:.2f} s")
    assert (m.path / "d" / "new.txt").read_bytes() == b"n"
    assert (m.path / "d" / "sub" / "f").read_bytes() == b"f"
    assert m.unmount() == 0


def test_default_mode_misses_cost_a_few_lists_a_second(
    s3_endpoint: str, bucket: str, mount: Any
) -> None:
    """rsync and tar look up each new name before creating it: in a directory whose listing
    is cached, a stream of misses costs at most four LISTs a second, never a request each."""
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        os.mkdir(m.path / "d")
        assert os.listdir(m.path / "d") == []
        assert proxy.wait_idle()
        proxy.reset()
        start, names = time.monotonic(), 0
        while time.monotonic() - start < 1.5:
            assert not (m.path / "d" / f"absent-{names}").exists()
            names += 1
        elapsed = time.monotonic() - start
        kinds = [e.kind for e in proxy.log]
        print(f"{names} misses in {elapsed:.2f} s: {len(kinds)} requests")
        assert names > 100
        assert set(kinds) <= {"ListObjects"}, kinds
        assert len(kinds) <= elapsed / 0.25 + 1, kinds
        assert m.unmount() == 0
