"""Objects over 5 GiB: one CopyObject cannot copy them, so rename, chmod, utime and
setxattr copy them in parts (UploadPartCopy). Writing 5 GiB in a test is too slow, so the
fault proxy answers CopyObject of the object as S3 answers one over 5 GiB."""

from __future__ import annotations

import os
import random
import stat
from typing import Any

from faultproxy import FaultProxy
from helpers import body, open_uploads, read_file

S3_TOO_LARGE = (
    "The specified copy source is larger than the maximum allowable size for a copy source: "
    "5368709120"
)


def test_copy_refused_as_too_large_goes_in_parts(
    s3: Any, bucket: str, mount: Any, s3_endpoint: str
) -> None:
    data = random.Random("huge").randbytes(3 * 1024 * 1024 + 7)
    s3.put_object(Bucket=bucket, Key="huge.bin", Body=data, Metadata={"mode": "33188"})
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(
            "CopyObject", "status", status=400, code="InvalidRequest", message=S3_TOO_LARGE
        )
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0")
        os.rename(m.path / "huge.bin", m.path / "moved.bin")  # rename: a copy, then delete
        os.chmod(m.path / "moved.bin", 0o600)  # metadata: a copy onto itself
        os.setxattr(m.path / "moved.bin", "user.color", b"blue")
        assert read_file(m.path / "moved.bin") == data
        assert m.unmount() == 0
        assert proxy.counts["UploadPartCopy"] >= 2
        assert proxy.counts["CopyObject"] >= 2  # each tried once, then refused as too large
    assert body(s3, bucket, "huge.bin") is None
    assert body(s3, bucket, "moved.bin") == data
    meta = s3.head_object(Bucket=bucket, Key="moved.bin")["Metadata"]
    assert stat.S_IMODE(int(meta["mode"])) == 0o600
    assert "color" in meta.get("xattr", "")
    assert open_uploads(s3, bucket) == []
