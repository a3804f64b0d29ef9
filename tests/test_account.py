"""Whole-account mounts: `fbmount MOUNTPOINT` / `--all-buckets`, one directory per bucket.

SeaweedFS answers ListBuckets with an empty list unless it knows its users, so this module
uses the session's auth_server (identities for the session keys), where bucket ACLs work
too.
Assertions name the buckets a test made, never the whole listing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    empty_and_delete_bucket,
    make_s3_client,
    unique_bucket_name,
    warm_bucket,
)
from helpers import status_json

from fbmount.account import bucket_name_problem
from fbmount.cli import config_from_args
from fbmount.errors import StartupError
from fbmount.localserver import LocalS3Server

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def s3_endpoint(auth_server: LocalS3Server) -> str:
    """Overrides the session server for this module: one that checks keys."""
    return auth_server.endpoint


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    return make_s3_client(s3_endpoint)


@pytest.fixture
def buckets(s3: Any) -> Iterator[Callable[[str], str]]:
    """Factory of bucket names a test owns: made here (or by the test through the mount),
    and deleted afterwards if still there."""
    names: list[str] = []

    def make(hint: str, create: bool = True) -> str:
        name = unique_bucket_name(hint)
        names.append(name)
        if create:
            s3.create_bucket(Bucket=name)
            warm_bucket(s3, name)
        return name

    yield make
    for name in names:
        with contextlib.suppress(Exception):
            empty_and_delete_bucket(s3, name)


def bucket_exists(s3: Any, name: str) -> bool:
    return name in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def errno_of(fn: Callable[[], Any]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


def test_buckets_are_directories_read_and_write(s3: Any, buckets: Any, mount: Any) -> None:
    one, two = buckets("acct-one"), buckets("acct-two")
    s3.put_object(Bucket=one, Key="docs/readme.txt", Body=b"hello from one")
    s3.put_object(Bucket=two, Key="top.bin", Body=b"\x00" * 1000)
    m = mount("--all-buckets", "--upload-delay", "0")

    listing = os.listdir(m.path)
    assert one in listing and two in listing
    assert stat.S_ISDIR(os.stat(m.path / one).st_mode)
    assert (m.path / one / "docs" / "readme.txt").read_bytes() == b"hello from one"
    assert os.listdir(m.path / two) == ["top.bin"]
    assert os.stat(m.path / two / "top.bin").st_size == 1000
    # Inode numbers of different buckets never collide (each bucket has its own range).
    inodes = {os.stat(p).st_ino for p in (m.path / one, m.path / one / "docs", m.path / two)}
    inodes.add(os.stat(m.path / two / "top.bin").st_ino)
    assert len(inodes) == 4

    (m.path / two / "new.txt").write_bytes(b"written through the account mount")
    assert s3.get_object(Bucket=two, Key="new.txt")["Body"].read() == (
        b"written through the account mount"
    )
    assert not (m.path / "no-such-bucket-here").exists()


def test_mkdir_creates_and_rmdir_removes_buckets(s3: Any, buckets: Any, mount: Any) -> None:
    name = buckets("acct-made", create=False)
    m = mount("--all-buckets")
    (m.path / name).mkdir()
    assert bucket_exists(s3, name)
    assert name in os.listdir(m.path)
    assert errno_of(lambda: (m.path / name).mkdir()) == errno.EEXIST

    (m.path / name / "sub").mkdir()
    (m.path / name / "sub" / "f.txt").write_text("x")
    assert errno_of(lambda: (m.path / name).rmdir()) == errno.ENOTEMPTY
    assert bucket_exists(s3, name)

    shutil.rmtree(m.path / name)  # unlinks (batched deletes), rmdir sub, rmdir the bucket
    assert not bucket_exists(s3, name)
    assert name not in os.listdir(m.path)
    assert not (m.path / name).exists()
    assert errno_of(lambda: (m.path / name).rmdir()) == errno.ENOENT

    (m.path / name).mkdir()  # the same name again: a new, empty bucket
    assert os.listdir(m.path / name) == []
    (m.path / name / "again.txt").write_text("again")
    m.unmount()
    assert s3.get_object(Bucket=name, Key="again.txt")["Body"].read() == b"again"


@pytest.mark.parametrize(
    "bad",
    ["Upper-Case", "ab", "a" * 64, "under_score", "192.168.10.1", "dots..twice", "-edge", "edge-"],
)
def test_bad_bucket_names_give_einval(s3: Any, mount: Any, bad: str) -> None:
    m = mount("--all-buckets")
    assert errno_of(lambda: (m.path / bad).mkdir()) == errno.EINVAL
    assert not bucket_exists(s3, bad)


def test_account_root_rules(s3: Any, buckets: Any, mount: Any) -> None:
    one, two = buckets("acct-a"), buckets("acct-b")
    s3.put_object(Bucket=one, Key="move-me.txt", Body=b"cross-bucket")
    m = mount("--all-buckets", "--upload-delay", "0")

    assert errno_of(lambda: (m.path / "file-at-root").write_text("no")) == errno.EPERM
    assert errno_of(lambda: os.symlink("x", m.path / "link-at-root")) == errno.EPERM
    assert errno_of(lambda: os.unlink(m.path / one)) == errno.EISDIR
    assert errno_of(lambda: os.chmod(m.path, 0o700)) == errno.EPERM
    # No request can move an object between buckets (or rename a bucket): EXDEV...
    assert (
        errno_of(lambda: os.rename(m.path / one / "move-me.txt", m.path / two / "moved.txt"))
        == errno.EXDEV
    )
    assert errno_of(lambda: os.rename(m.path / one, m.path / "renamed-bucket")) == errno.EXDEV
    # ...so mv copies and deletes, as between two filesystems.
    subprocess.run(["mv", str(m.path / one / "move-me.txt"), str(m.path / two)], check=True)
    assert s3.get_object(Bucket=two, Key="move-me.txt")["Body"].read() == b"cross-bucket"
    assert "Contents" not in s3.list_objects_v2(Bucket=one)
    assert os.listxattr(m.path) == []


def test_one_positional_mounts_the_account(
    s3: Any, buckets: Any, s3_endpoint: str, run_fbmount: Run, tmp_path: Path
) -> None:
    """`fbmount MOUNTPOINT` (daemonized, as a user types it) is the account mount."""
    name = buckets("acct-cli")
    mnt = tmp_path / "acct"
    mnt.mkdir()
    r = run_fbmount(str(mnt), "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    try:
        assert name in os.listdir(mnt)
        fsname = next(
            line.split()[0]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1] == str(mnt)
        )
        assert fsname.startswith("all-buckets@")
    finally:
        r = run_fbmount("umount", str(mnt), timeout=60)
        assert r.returncode == 0, r.stderr


def test_listing_the_account_loads_no_bucket(
    s3: Any, buckets: Any, mount: Any, run_fbmount: Run
) -> None:
    """`ls -l` of the top is one ListBuckets (+ one GetBucketAcl per bucket, once): no
    bucket is listed or opened until used."""
    for i in range(3):
        buckets(f"acct-lazy-{i}")
    m = mount("--all-buckets")

    before = status_json(run_fbmount, m.path)["requests"]
    subprocess.run(["ls", "-l", str(m.path)], capture_output=True, check=True)
    subprocess.run(["ls", "-l", str(m.path)], capture_output=True, check=True)
    after = status_json(run_fbmount, m.path)["requests"]
    grown = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert set(grown) <= {"ListBuckets", "GetBucketAcl"}, grown
    assert grown.get("ListBuckets", 0) <= 1, grown


def test_status_and_sync_name_the_bucket(
    s3: Any, buckets: Any, mount: Any, run_fbmount: Run
) -> None:
    name = buckets("acct-sync")
    m = mount("--all-buckets", "--upload-delay", "3600")
    (m.path / name / "later.txt").write_text("staged")
    status = status_json(run_fbmount, m.path)
    assert status["pending_files"] == 1
    assert status["source"].startswith("all-buckets@")
    assert "Contents" not in s3.list_objects_v2(Bucket=name)

    r = run_fbmount("sync", str(m.path), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert s3.get_object(Bucket=name, Key="later.txt")["Body"].read() == b"staged"


def test_crash_recovery_per_bucket(s3: Any, buckets: Any, mount: Any) -> None:
    """A file staged in one bucket when the daemon died is uploaded when that bucket is
    next used, and the account root never shows it in the wrong bucket."""
    one, two = buckets("acct-crash-a"), buckets("acct-crash-b")
    m = mount("--all-buckets", "--upload-delay", "3600")
    (m.path / one / "saved.txt").write_text("survives kill -9")
    (m.path / two / "other.txt").write_text("me too")
    m.kill9()
    assert "Contents" not in s3.list_objects_v2(Bucket=one)

    m2 = mount("--all-buckets", cache_dir=m.cache_dir, mountpoint=m.path)
    assert (m2.path / one / "saved.txt").read_text() == "survives kill -9"
    assert sorted(os.listdir(m2.path / two)) == ["other.txt"]
    m2.sync()
    assert s3.get_object(Bucket=one, Key="saved.txt")["Body"].read() == b"survives kill -9"
    assert sorted(os.listdir(m2.path / two)) == ["other.txt"]
    assert s3.get_object(Bucket=two, Key="other.txt")["Body"].read() == b"me too"


def test_bucket_acl_sets_default_mode(s3: Any, buckets: Any, mount: Any) -> None:
    """Objects that carry no mode show the bucket's ACL: private → not world-readable,
    public-read → world-readable; -o umask wins over both."""
    private, public = buckets("acct-private"), buckets("acct-public")
    for name in (private, public):
        s3.put_object(Bucket=name, Key="plain.txt", Body=b"no mode metadata")
    s3.put_bucket_acl(Bucket=public, ACL="public-read")
    acl = s3.get_bucket_acl(Bucket=public)  # the server keeps it (it needs identities)
    assert any(g["Grantee"].get("URI", "").endswith("AllUsers") for g in acl["Grants"])

    m = mount("--all-buckets")
    # The top level shows the ACL's mode before either bucket is opened...
    listed = subprocess.run(["ls", "-l", str(m.path)], capture_output=True, text=True, check=True)
    modes = {line.split()[-1]: line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert modes[private] == "drwxr-x---" and modes[public] == "drwxr-xr-x", listed.stdout
    assert stat.S_IMODE(os.stat(m.path / private / "plain.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(m.path / private).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(m.path / public / "plain.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(m.path / public).st_mode) == 0o755
    assert os.getxattr(m.path / public, "user.fbmount.acl") == b"public-read"

    single = mount(private)  # a one-bucket mount follows the same rule
    assert stat.S_IMODE(os.stat(single.path / "plain.txt").st_mode) == 0o640
    explicit = mount(private, "-o", "umask=002")
    assert stat.S_IMODE(os.stat(explicit.path / "plain.txt").st_mode) == 0o664


def test_bad_credentials_fail_in_one_line(
    s3_endpoint: str, run_fbmount: Run, tmp_path: Path
) -> None:
    mnt = tmp_path / "acct"
    mnt.mkdir()
    r = run_fbmount(
        str(mnt),
        "--endpoint",
        s3_endpoint,
        env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fbmount: "), r.stderr
    assert "refused the credentials" in lines[0]
    assert not os.path.ismount(mnt)


def test_read_only_account_refuses_bucket_changes(s3: Any, buckets: Any, mount: Any) -> None:
    name = buckets("acct-ro")
    m = mount("--all-buckets", "--read-only")
    assert name in os.listdir(m.path)
    assert errno_of(lambda: (m.path / "acct-ro-new-bucket").mkdir()) == errno.EROFS
    assert errno_of(lambda: (m.path / name).rmdir()) == errno.EROFS
    assert bucket_exists(s3, name)


# ----------------------------------------------------------------- pure logic (no mount)
@pytest.mark.parametrize(
    "argv",
    [
        ["/m"],
        ["--all-buckets", "/m"],
        ["none", "/m", "-o", "all_buckets"],
        ["-o", "all_buckets", "/m"],
    ],
)
def test_command_lines_that_mean_the_account(argv: list[str]) -> None:
    cfg = config_from_args(argv)
    assert cfg.all_buckets and cfg.bucket is None and cfg.mountpoint == Path("/m")
    assert cfg.state_dir().name.startswith("account-")
    assert cfg.bucket_state_dir("b1").parent == cfg.state_dir() / "buckets"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["b", "/m", "--all-buckets"], "give only MOUNTPOINT"),
        (["b:p", "/m", "-o", "all_buckets"], "give only MOUNTPOINT"),
        (["a", "b", "c"], "usage"),
    ],
)
def test_account_command_line_errors(argv: list[str], message: str) -> None:
    with pytest.raises(StartupError, match=message):
        config_from_args(argv)


@pytest.mark.parametrize("name", ["abc", "my-bucket.2026", "a" * 63, "0-9"])
def test_valid_bucket_names(name: str) -> None:
    assert bucket_name_problem(name) is None


@pytest.mark.parametrize(
    "name", ["ab", "a" * 64, "Abc", "a_b", "a..b", "a.-b", "-ab", "ab.", "10.0.0.1", "ab/c"]
)
def test_invalid_bucket_names(name: str) -> None:
    assert bucket_name_problem(name)


def test_doctor_checks_the_account(
    s3: Any, buckets: Any, s3_endpoint: str, run_fbmount: Run
) -> None:
    buckets("acct-doctor")
    r = run_fbmount("doctor", "--endpoint", s3_endpoint, timeout=60)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "ok    account: " in r.stdout and "bucket(s) listable" in r.stdout, r.stdout
    bad = run_fbmount(
        "doctor", "--endpoint", s3_endpoint, env={"AWS_SECRET_ACCESS_KEY": "nope"}, timeout=60
    )
    assert bad.returncode == 1
    assert "FAIL  account: " in bad.stdout, bad.stdout
