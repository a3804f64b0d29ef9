"""Name lookups on a fresh mount: what decides between one listing and a request per name.

`stat` of many names in a directory (rsync, tar, a backup's verify pass) must be answered
by a few LIST pages, whatever the directory's size up to fbmount.fs.LOOKUP_PAGES pages;
it used to cost a HEAD + LIST per name as soon as the directory held more than one page
(1,000 entries), which on a 30 ms link turned 0.1 s into 18 s. Counted at the fault proxy.
"""

from __future__ import annotations

import os
from typing import Any

from conftest import MountFactory
from faultproxy import FaultProxy
from helpers import sync_path

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
