"""Name lookups on a fresh mount: what decides between one listing and a request per name.

`stat` of many names in a directory (rsync, tar, a backup's verify pass) must be answered
by a few LIST pages, whatever the directory's size up to fbmount.fs.LOOKUP_PAGES pages;
it used to cost a HEAD + LIST per name as soon as the directory held more than one page
(1,000 entries), which on a 30 ms link turned 0.1 s into 18 s. Counted at the fault proxy.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import MountFactory
from faultproxy import FaultProxy
from helpers import sync_path, wait_for

FILES = 1_100  # more than one LIST page (1,000 keys)
STATS = 500


def test_cold_stat_of_names_in_a_directory_bigger_than_a_page_is_a_listing(
    s3: Any, s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        # Both mounts through the one proxy: the cache directory (and its metadata index,
        # which knows every file's headers, so no HEAD is needed for a listed name's mode
        # and mtime) is named after the endpoint.
        m = mount(bucket, "--endpoint", proxy.endpoint)
        big = m.path / "big"
        big.mkdir()
        for i in range(FILES):
            (big / f"f{i:05d}").write_bytes(b"x" * (i % 7))
        sync_path(m.path)
        assert m.unmount() == 0, m.log_text()

        m = mount(bucket, "--endpoint", proxy.endpoint, cache_dir=m.cache_dir)
        proxy.wait_idle()
        proxy.reset()
        for i in range(0, FILES, FILES // STATS):
            st = os.stat(m.path / "big" / f"f{i:05d}")
            assert st.st_size == i % 7
        assert not (m.path / "big" / "absent").exists()
        proxy.wait_idle()
        counts = dict(proxy.counts)
    # The root's and big/'s listings (two pages) and big/'s marker: nothing per name.
    assert counts.get("ListObjects", 0) <= 4, counts
    assert counts.get("HeadObject", 0) <= 1, counts
    assert sum(counts.values()) <= 5, counts


def test_ls_of_a_directory_the_index_knows_sends_no_head(
    s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    """A fresh mount with the same cache dir lists a 200-file directory with every mode
    from the metadata index (read for the whole directory at once: MetaIndex.under) and
    no HEAD; readdir would HEAD each unknown entry of a directory this small."""
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        d = m.path / "d"
        d.mkdir()
        for i in range(200):
            (d / f"f{i:03d}").write_bytes(b"x")
            os.chmod(d / f"f{i:03d}", 0o600 | (i % 8) << 3)
        sync_path(m.path)
        assert m.unmount() == 0, m.log_text()

        m = mount(bucket, "--endpoint", proxy.endpoint, cache_dir=m.cache_dir)
        proxy.wait_idle()
        proxy.reset()
        names = sorted(os.listdir(m.path / "d"))
        assert len(names) == 200
        for i, name in enumerate(names):
            assert os.lstat(m.path / "d" / name).st_mode & 0o777 == 0o600 | (i % 8) << 3, name
        proxy.wait_idle()
        counts = dict(proxy.counts)
    assert counts.get("HeadObject", 0) <= 1, counts  # d/'s marker at most


def test_rm_rf_of_files_another_client_wrote_heads_only_what_could_be_a_symlink(
    s3: Any, s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    """`rm -rf` reads each directory (getdents) and unlinks; it never stats a file. On a
    fresh mount with an empty cache dir, readdir HEADs only the entries a listing cannot
    type (under 4,096 bytes: a symlink's target fits); a bigger one is a regular file for
    sure, and its mode, owner and times are fetched when something asks for them (a
    `stat` HEADs that entry's unknown siblings together)."""
    for i in range(40):
        s3.put_object(
            Bucket=bucket,
            Key=f"t/big{i:02d}",
            Body=b"b" * (4096 + i),
            Metadata={"mode": str(0o100640 if i == 7 else 0o100644), "mtime": "1500000000"},
        )
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"t/small{i}", Body=b"s")
    s3.put_object(Bucket=bucket, Key="t/link", Body=b"big00", Metadata={"mode": str(0o120777)})
    s3.put_object(Bucket=bucket, Key="u/big", Body=b"b" * 5000, Metadata={"mode": "33216"})
    for i in range(30):
        s3.put_object(Bucket=bucket, Key=f"r/d{i % 3}/f{i:02d}", Body=b"r" * 8192)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        proxy.wait_idle()
        proxy.reset()
        entries = {e.name: e for e in os.scandir(m.path / "t")}
        assert entries["link"].is_symlink()
        assert entries["big03"].is_file() and not entries["big03"].is_symlink()
        proxy.wait_idle()
        heads = proxy.counts.get("HeadObject", 0)
        assert heads <= 4 + 1, dict(proxy.counts)  # small0-2, link and t/'s marker

        # Asked for, the attributes are the object's own: x-amz-meta-mode and -mtime.
        st = os.stat(m.path / "t" / "big07")
        assert st.st_mode & 0o777 == 0o640 and st.st_mtime == 1500000000
        assert os.lstat(m.path / "t" / "big08").st_mode & 0o777 == 0o644
        assert os.readlink(m.path / "t" / "link") == "big00"
        assert os.stat(m.path / "u" / "big").st_mode & 0o777 == 0o700  # a lookup HEADs
        proxy.wait_idle()
        proxy.reset()

        subprocess.run(["rm", "-rf", m.path / "r", m.path / "t"], check=True, timeout=60)
        assert not (m.path / "r").exists() and not (m.path / "t").exists()
        proxy.wait_idle()
        counts = dict(proxy.counts)
    assert counts.get("HeadObject", 0) <= 4, counts  # the directories' markers at most
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])) == [
        "u/big"
    ]


@pytest.mark.parametrize("fillers", [0, 300])
def test_a_change_to_a_listed_file_keeps_the_metadata_it_was_not_asked_for(
    s3: Any, bucket: str, mount: MountFactory, fillers: int
) -> None:
    """A chmod or a write to a file whose headers were never fetched (a listed entry of
    4,096 bytes or more: readdir leaves its HEAD for later; any entry of a directory too
    big for readdir to HEAD) fetches them first: the object keeps its owner and times,
    and only what was changed changes."""
    meta = {"mode": str(0o100644), "uid": "1234", "gid": "4321", "mtime": "1500000000"}
    for name in ("chmod", "write"):
        s3.put_object(Bucket=bucket, Key=f"t/{name}", Body=b"b" * 5000, Metadata=meta)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket=bucket, Key=f"t/x{i:03d}", Body=b"x"), range(fillers)
            )
        )
    m = mount(bucket)
    assert len(os.listdir(m.path / "t")) == 2 + fillers
    os.chmod(m.path / "t" / "chmod", 0o600)
    with open(m.path / "t" / "write", "r+b") as f:
        f.write(b"w")
    for name in ("chmod", "write"):
        sync_path(m.path / "t" / name)
    for name, mode in (("chmod", 0o100600), ("write", 0o100644)):
        got = s3.head_object(Bucket=bucket, Key=f"t/{name}")["Metadata"]
        assert int(got["mode"]) == mode, (name, got)
        assert (got["uid"], got["gid"]) == ("1234", "4321"), (name, got)
    got = s3.head_object(Bucket=bucket, Key="t/chmod")["Metadata"]
    assert got["mtime"].startswith("1500000000"), got


def test_a_failed_batched_head_fails_only_the_stats_that_waited_for_it(
    s3: Any, s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    """A listed file's HEAD that fails inside another file's batch does not fail a later
    stat of it, whose own HEAD succeeds; and a chmod waiting on a HEAD that fails fails
    too, rather than store the listing's defaults over the object's owner and times."""
    meta = {"mode": str(0o100644), "uid": "1234", "gid": "4321", "mtime": "1500000000"}
    for key in ("t/big0", "t/big1", "t/big2", "u/f"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"b" * 5000, Metadata=meta)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        os.listdir(m.path / "t")
        os.listdir(m.path / "u")
        denied = proxy.add_rule(
            "HeadObject", key="t/big2", status=403, code="AccessDenied", times=1
        )
        assert os.stat(m.path / "t" / "big0").st_mode & 0o777 == 0o644  # big2 fails in its batch
        wait_for(lambda: denied.fired == 1, "big2's HEAD denied")
        proxy.wait_idle()
        time.sleep(0.5)  # the daemon has taken the answer: big2's next stat asks again
        assert os.stat(m.path / "t" / "big2").st_size == 5000  # asked again: 200

        proxy.add_rule("HeadObject", "delay", key="u/f", seconds=1.5, times=1)
        proxy.add_rule("HeadObject", key="u/f", status=403, code="AccessDenied", times=1)
        errors: list[OSError] = []

        def stat() -> None:
            try:
                os.stat(m.path / "u" / "f")
            except OSError as e:
                errors.append(e)

        waiter = threading.Thread(target=stat)
        waiter.start()
        time.sleep(0.5)  # the stat's HEAD is out, held by the proxy
        with pytest.raises(OSError):
            os.chmod(m.path / "u" / "f", 0o600)
        waiter.join(30)
        assert errors, "the stat waiting on the failed HEAD succeeded"
        os.chmod(m.path / "u" / "f", 0o600)  # asked again: 200
        sync_path(m.path / "u" / "f")
    got = s3.head_object(Bucket=bucket, Key="u/f")["Metadata"]
    assert (got["uid"], got["gid"], int(got["mode"])) == ("1234", "4321", 0o100600), got


def test_a_stat_of_each_small_file_heads_its_siblings_ahead(
    s3: Any, s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    """Files under 4,096 bytes could be symlinks, so a lookup of one that the metadata
    index does not know (another client wrote it) needs its HEAD. A lone `stat` sends that
    one HEAD; the second in the directory within a second is a scan, and the next unknown
    siblings are HEADed with it in one parallel round (a far link: a round trip per batch,
    not per name). Every name is HEADed once, and the symlink among them is one."""
    for i in range(40):
        key = f"s/f{i:02d}"
        if i == 20:
            s3.put_object(Bucket=bucket, Key=key, Body=b"f00", Metadata={"mode": str(0o120777)})
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        d = m.path / "s"
        os.stat(d)
        proxy.wait_idle()
        proxy.reset()
        os.stat(d / "f00")
        assert proxy.counts["HeadObject"] == 1, dict(proxy.counts)

        held = proxy.add_rule("HeadObject", "hold")
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(os.stat, d / "f01")
            try:
                wait_for(lambda: held.seen >= 16, "the siblings' HEADs sent together", 10)
            finally:
                held.release()
            done.result(timeout=30)
        for i in range(2, 40):
            os.lstat(d / f"f{i:02d}")
        assert os.readlink(d / "f20") == "f00"
        assert sorted(e.name for e in os.scandir(d) if e.is_symlink()) == ["f20"]
        proxy.wait_idle()
        heads = proxy.paths("HeadObject")
    assert len(heads) == 40 == len(set(heads)), sorted(heads)
