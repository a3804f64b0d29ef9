"""The first things a new user does, on whatever versions pip installed: mount, write a
file larger than a part, read a seeded object, rename over a file, unmount.

Marked `smoke`: the floor pass of .ci/run runs only these, on the lowest dependency
versions pyproject.toml declares (tests/floors.txt), so those floors stay true. The 64 MiB
file is the regression for the mount that died on first use when trio renamed
to_thread.run_sync(cancellable=) (every ranged GET and part upload went through it).
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from helpers import body, open_uploads, read_file, write_file

pytestmark = pytest.mark.smoke
MiB = 1 << 20


def test_mount_write_read_rename_unmount(s3: Any, bucket: str, mount: Any) -> None:
    big = random.Random("smoke-big").randbytes(64 * MiB + 12345)
    seeded = random.Random("smoke-seeded").randbytes(20 * MiB + 1)
    s3.put_object(Bucket=bucket, Key="seeded.bin", Body=seeded)
    s3.put_object(Bucket=bucket, Key="dir/old.txt", Body=b"old contents")
    m = mount(bucket, "--part-size", "8")

    assert read_file(m.path / "seeded.bin") == seeded  # ranged GETs in worker threads
    write_file(m.path / "big.bin", big)  # streamed parts, then a multipart upload
    assert read_file(m.path / "big.bin") == big
    write_file(m.path / "dir" / "new.txt", b"new contents")
    os.rename(m.path / "dir" / "new.txt", m.path / "dir" / "old.txt")
    os.rename(m.path / "seeded.bin", m.path / "dir" / "seeded.bin")  # server-side copy
    assert sorted(os.listdir(m.path / "dir")) == ["old.txt", "seeded.bin"]
    assert read_file(m.path / "dir" / "old.txt") == b"new contents"

    assert m.unmount() == 0
    assert body(s3, bucket, "big.bin") == big
    assert body(s3, bucket, "dir/old.txt") == b"new contents"
    assert body(s3, bucket, "dir/seeded.bin") == seeded
    assert body(s3, bucket, "seeded.bin") is None
    assert open_uploads(s3, bucket) == []

    m2 = mount(bucket, mountpoint=m.path)  # and a fresh mount sees it all
    assert read_file(m2.path / "big.bin") == big
    assert m2.unmount() == 0
