"""Unit tests of the on-bucket format (fbmount.format): pure, no server.

The s3fs and rclone examples are the exact headers s3fs 1.90 and rclone 1.75 (`copy -M`)
wrote to a SeaweedFS bucket on this machine, so compatibility is checked against what the
peers really emit, not against our reading of their source.
"""

from __future__ import annotations

import random
import stat
from collections.abc import Iterator, Mapping
from urllib.parse import quote, unquote

import pytest

from fbmount import format as fmt
from fbmount.format import ObjectMeta

NS = 1_000_000_000

# --- what the peers wrote ------------------------------------------------------------

# s3fs 1.90: `touch -d "2012-11-27 18:15:05.5" old; chown 1234:5678 old; chmod 2644 old`
S3FS_FILE = {
    "atime": "1354040105.500000000",
    "ctime": "1795616491",
    "gid": "5678",
    "mode": "34212",
    "mtime": "1354040105.500000000",
    "uid": "1234",
}
S3FS_FIFO = {"atime": "1795616491", "gid": "0", "mode": "4516", "mtime": "1795616491", "uid": "0"}
S3FS_LINK = {"atime": "1795616491", "gid": "0", "mode": "41471", "mtime": "1795616491", "uid": "0"}
# s3fs 1.90: `touch -d "1960-01-01 00:00:00.25" g.txt`
S3FS_PRE_EPOCH = {"mode": "33188", "mtime": "-315619200.250000000"}
# rclone 1.75 `copy -M` of a 0640 file with user.color=blue, mtime 2012-11-27 18:15:05.5
RCLONE_FILE = {
    "atime": "2012-11-27T18:15:05.5Z",
    "btime": "2026-11-25T14:21:10.955576413Z",
    "color": "blue",
    "gid": "0",
    "mode": "100640",
    "mtime": "1354040105.5",
    "uid": "0",
}
# rclone 1.75 `copy -M --links` of a symlink: key "link.rclonelink", body "a.txt"
RCLONE_LINK = {
    "atime": "2026-11-25T14:21:10.969970292Z",
    "btime": "2026-11-25T14:21:10.963576414Z",
    "gid": "0",
    "mode": "120777",
    "mtime": "1795616470.963576414",
    "uid": "0",
}


# --- encode: exact s3fs spelling -----------------------------------------------------


def test_encode_regular_file_matches_s3fs() -> None:
    meta = ObjectMeta(
        mode=stat.S_IFREG | 0o644,
        uid=1000,
        gid=100,
        mtime_ns=1_700_000_000 * NS,
        ctime_ns=1_700_000_000 * NS + 123_456_789,
        atime_ns=1_700_000_000 * NS + 500_000_000,
    )
    assert fmt.encode_meta(meta) == {
        "mode": "33188",
        "uid": "1000",
        "gid": "100",
        "mtime": "1700000000",
        "ctime": "1700000000.123456789",
        "atime": "1700000000.500000000",
    }


def test_encode_leaves_out_what_is_unknown() -> None:
    assert fmt.encode_meta(ObjectMeta()) == {}
    assert fmt.encode_meta(ObjectMeta(mode=0o755)) == {"mode": "493"}  # s3fs mkdir style


def test_encode_dir_and_symlink_modes() -> None:
    assert fmt.encode_meta(ObjectMeta(mode=stat.S_IFDIR | 0o755))["mode"] == "16877"
    assert fmt.encode_meta(ObjectMeta(mode=fmt.LINK_MODE))["mode"] == "41471"


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0"),
        (1, "0.000000001"),
        (999_999_999, "0.999999999"),
        (1_354_040_105_500_000_000, "1354040105.500000000"),
        (-NS, "-1"),
        (-NS // 2, "-1.500000000"),  # -0.5 s is timespec {-1, 500000000}
        (-315_619_199_750_000_000, "-315619200.250000000"),  # what s3fs wrote for 1960
        (2**63 - 1, "9223372036.854775807"),
        (-(2**63), "-9223372037.145224192"),
    ],
)
def test_format_time_is_s3fs_timespec(ns: int, text: str) -> None:
    assert fmt.format_time_ns(ns) == text
    assert fmt.parse_time_ns(text) == ns


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 1.5, "1", True])
def test_format_time_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError):
        fmt.format_time_ns(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "meta",
    [
        ObjectMeta(mode=-1),
        ObjectMeta(mode=0o200000),
        ObjectMeta(mode=0o030644),  # not a file type
        ObjectMeta(uid=-1),
        ObjectMeta(gid=2**32 - 1),
        ObjectMeta(uid=2**40),
        ObjectMeta(mtime_ns=2**64),
    ],
)
def test_encode_refuses_numbers_no_inode_can_have(meta: ObjectMeta) -> None:
    with pytest.raises(ValueError):
        fmt.encode_meta(meta)


def test_encode_never_writes_cid() -> None:
    out = fmt.encode_meta(ObjectMeta(mode=0o100644, cid="bafybeigdyrzt5sfp7udm7hu76uh7y26nf3"))
    assert "cid" not in out


def test_encode_keeps_extra_but_owned_keys_win() -> None:
    meta = ObjectMeta(
        mode=0o100600,
        extra={"btime": "2026-11-25T14:21:10.955Z", "color": "blue", "mode": "777"},
    )
    out = fmt.encode_meta(meta)
    assert out == {"btime": "2026-11-25T14:21:10.955Z", "color": "blue", "mode": "33152"}


@pytest.mark.parametrize(
    "extra",
    [
        {"café": "x"},  # key not an HTTP token
        {"Upper": "x"},  # S3 lower-cases keys: would not come back the same
        {"sp ace": "x"},
        {"k": "caf\u00e9"},  # not ASCII
        {"k": "a\r\nX-Injected: 1"},  # header injection
        {"k": "tab\there"},
        {"cid": "bafy"},  # owned/consumed keys are never copied from extra
        {"permissions": "777"},
    ],
)
def test_encode_drops_extra_that_cannot_travel_as_a_header(extra: dict[str, str]) -> None:
    assert fmt.encode_meta(ObjectMeta(extra=extra)) == {}


def test_encode_output_is_ascii_even_for_non_ascii_xattrs() -> None:
    meta = ObjectMeta(
        mode=0o100644,
        xattrs={"user.名前": "värde ✓".encode(), "user.bin": bytes(range(256))},
    )
    out = fmt.encode_meta(meta)
    for key, value in out.items():
        assert key.isascii() and value.isascii()
        assert all(" " < c <= "~" for c in value)


# --- decode: s3fs --------------------------------------------------------------------


def test_decode_s3fs_file() -> None:
    meta = fmt.decode_meta(S3FS_FILE)
    assert meta.mode == stat.S_IFREG | 0o2644
    assert (meta.uid, meta.gid) == (1234, 5678)
    assert meta.mtime_ns == meta.atime_ns == 1_354_040_105_500_000_000
    assert meta.ctime_ns == 1_795_616_491 * NS
    assert meta.xattrs == {} and meta.extra == {} and meta.cid is None


def test_decode_s3fs_fifo_and_symlink() -> None:
    assert fmt.decode_meta(S3FS_FIFO).mode == stat.S_IFIFO | 0o644
    link = fmt.decode_meta(S3FS_LINK)
    assert link.mode == fmt.LINK_MODE
    assert fmt.is_symlink_meta(link)


# s3fs's mknod writes mode, uid, gid and times only (create_file_object): no device number.
S3FS_CHAR_DEVICE = {"atime": "1795616491", "gid": "0", "mode": "8612", "uid": "0"}


@pytest.mark.parametrize(
    ("metadata", "mode", "rdev"),
    [
        (S3FS_FIFO, stat.S_IFIFO | 0o644, None),
        (S3FS_CHAR_DEVICE, stat.S_IFCHR | 0o644, None),
        ({"mode": "24992", "rdev": "2049"}, stat.S_IFBLK | 0o640, 2049),  # fbmount/GeeseFS
        ({"mode": "49645"}, stat.S_IFSOCK | 0o755, None),  # s3fs: bound Unix socket
        ({"mode": "10644"}, stat.S_IFIFO | 0o644, None),  # rclone octal
        ({"mode": "20600", "rdev": "259"}, stat.S_IFCHR | 0o600, 259),  # octal mode
        ({"mode": "8612", "rdev": "4294967295"}, stat.S_IFCHR | 0o644, 0xFFFFFFFF),
        ({"mode": "8612", "rdev": "4294967296"}, stat.S_IFCHR | 0o644, None),  # > 32 bits
        ({"mode": "8612", "rdev": "-1"}, stat.S_IFCHR | 0o644, None),
        ({"mode": "8612", "rdev": "0x103"}, stat.S_IFCHR | 0o644, None),
    ],
)
def test_decode_special_files(metadata: dict[str, str], mode: int, rdev: int | None) -> None:
    meta = fmt.decode_meta(metadata)
    assert (meta.mode, meta.rdev) == (mode, rdev)
    assert "rdev" not in meta.extra  # owned: never written back twice
    assert fmt.resolve_mode(meta.mode, "file") == mode


def test_encode_device_writes_rdev_in_decimal() -> None:
    meta = ObjectMeta(mode=stat.S_IFCHR | 0o620, uid=0, gid=5, rdev=(4 << 8) | 1)
    assert fmt.encode_meta(meta) == {"mode": "8592", "uid": "0", "gid": "5", "rdev": "1025"}
    assert fmt.decode_meta(fmt.encode_meta(meta)) == meta
    assert "rdev" not in fmt.encode_meta(ObjectMeta(mode=stat.S_IFIFO | 0o644))
    for bad in (-1, 1 << 32, True):
        with pytest.raises(ValueError):
            fmt.encode_meta(ObjectMeta(rdev=bad))


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("user.color", True),
        ("user.fbmount.etag", True),  # read-only, but a user name (fs.py guards it)
        ("key1", True),  # set by s3fs's own tests through its API: no namespace
        ("os2.name", True),
        ("security.selinux", False),
        ("security.capability", False),  # would grant capabilities on exec
        ("system.posix_acl_access", False),
        ("trusted.overlay.opaque", False),
        ("securityx", True),  # a prefix match needs the dot
    ],
)
def test_user_xattr_excludes_the_kernel_namespaces(name: str, shown: bool) -> None:
    assert fmt.user_xattr(name) is shown


def test_decode_s3fs_pre_epoch_fraction_is_a_timespec() -> None:
    # s3fs wrote tv_sec=-315619200, tv_nsec=250000000 for 1960-01-01 00:00:00.25
    assert fmt.decode_meta(S3FS_PRE_EPOCH).mtime_ns == -315_619_199_750_000_000


def test_decode_s3fs_dir_mode_without_type_bits() -> None:
    meta = fmt.decode_meta({"mode": "493"})
    assert meta.mode == 0o755
    assert fmt.resolve_mode(meta.mode, "dir") == stat.S_IFDIR | 0o755


def test_s3fs_round_trip_through_encode() -> None:
    for headers in (S3FS_FILE, S3FS_FIFO, S3FS_LINK, S3FS_PRE_EPOCH):
        assert fmt.encode_meta(fmt.decode_meta(headers)) == headers


# --- decode: rclone ------------------------------------------------------------------


def test_decode_rclone_file() -> None:
    meta = fmt.decode_meta(RCLONE_FILE)
    assert meta.mode == stat.S_IFREG | 0o640
    assert (meta.uid, meta.gid) == (0, 0)
    assert meta.mtime_ns == 1_354_040_105_500_000_000
    assert meta.atime_ns == 1_354_040_105_500_000_000  # RFC 3339
    assert meta.ctime_ns is None
    # rclone stores user.color as a bare key: not an s3fs xattr, kept verbatim
    assert meta.xattrs == {}
    assert meta.extra == {"btime": "2026-11-25T14:21:10.955576413Z", "color": "blue"}


def test_decode_rclone_symlink() -> None:
    meta = fmt.decode_meta(RCLONE_LINK)
    assert meta.mode == fmt.LINK_MODE
    assert meta.mtime_ns == 1_795_616_470_963_576_414


def test_rclone_metadata_survives_a_chmod() -> None:
    meta = fmt.decode_meta(RCLONE_FILE)
    chmodded = fmt.encode_meta(
        ObjectMeta(
            mode=stat.S_IFREG | 0o600,
            uid=meta.uid,
            gid=meta.gid,
            mtime_ns=meta.mtime_ns,
            atime_ns=meta.atime_ns,
            extra=meta.extra,
        )
    )
    assert chmodded["btime"] == RCLONE_FILE["btime"]
    assert chmodded["color"] == "blue"
    assert chmodded["mode"] == "33152"
    assert chmodded["mtime"] == "1354040105.500000000"
    assert fmt.decode_meta(chmodded).mtime_ns == meta.mtime_ns


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("100664", 0o100664),
        ("0100664", 0o100664),  # rclone's documented example
        ("40755", 0o40755),
        ("40700", 0o40700),
        ("42775", 0o42775),  # setgid dir: decimal would be a symlink with odd bits
        ("41777", 0o41777),  # sticky dir
        ("120777", 0o120777),
        ("10644", 0o10644),  # fifo: decimal would be a setuid char device
        ("140755", 0o140755),
        ("20620", 0o20620),  # char device
        ("60660", 0o60660),  # block device
    ],
)
def test_parse_mode_rclone_octal(text: str, mode: int) -> None:
    assert fmt.parse_mode(text) == mode


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("33188", 0o100644),
        ("33261", 0o100755),  # only octal digits, but octal 0o33261 is no file type
        ("34212", 0o102644),
        ("16877", 0o40755),
        ("16893", 0o40775),
        ("41471", 0o120777),  # symlink; as octal it would be a dir with mode 1471
        ("4516", 0o10644),  # fifo from s3fs mknod
        ("49645", 0o140755),
        ("493", 0o755),
        ("511", 0o777),
        ("420", 0o644),
        ("1023", 0o1777),  # untyped sticky dir mode from s3fs mkdir
        ("0", 0),
        ("0x81a4", 0o100644),  # s3fs reads with strtol base 0
        (" 33188 ", 0o100644),
    ],
)
def test_parse_mode_s3fs_decimal(text: str, mode: int) -> None:
    assert fmt.parse_mode(text) == mode


@pytest.mark.parametrize(("text", "mode"), [("644", 0o644), ("755", 0o755), ("600", 0o600)])
def test_parse_mode_hand_written_octal(text: str, mode: int) -> None:
    # decimal 644 would be 0o1204 (sticky, -w----r--): nobody means that
    assert fmt.parse_mode(text) == mode


# --- decode: legacy tools ------------------------------------------------------------


def test_decode_s3sync_keys() -> None:
    meta = fmt.decode_meta({"permissions": "33188", "owner": "12", "group": "34"})
    assert (meta.mode, meta.uid, meta.gid) == (0o100644, 12, 34)
    assert meta.extra == {}


def test_decode_gsutil_keys() -> None:
    meta = fmt.decode_meta(
        {
            "goog-reserved-posix-mode": "644",
            "goog-reserved-posix-uid": "1000",
            "goog-reserved-posix-gid": "1000",
            "goog-reserved-file-mtime": "1600000000",
        }
    )
    assert (meta.mode, meta.uid, meta.gid) == (0o644, 1000, 1000)
    assert meta.mtime_ns == 1_600_000_000 * NS


def test_primary_keys_win_and_garbage_falls_back() -> None:
    meta = fmt.decode_meta({"mode": "33188", "permissions": "16877"})
    assert meta.mode == 0o100644
    meta = fmt.decode_meta({"mode": "garbage", "permissions": "16877"})
    assert meta.mode == 0o40755
    meta = fmt.decode_meta({"mtime": "yesterday", "goog-reserved-file-mtime": "5"})
    assert meta.mtime_ns == 5 * NS


def test_decode_is_case_insensitive_on_keys() -> None:
    meta = fmt.decode_meta({"Mode": "33188", "UID": "7", "X-Other": "v"})
    assert (meta.mode, meta.uid) == (0o100644, 7)
    assert meta.extra == {"x-other": "v"}


def test_decode_filebase_cid() -> None:
    cid = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
    meta = fmt.decode_meta({"cid": cid, "mode": "33188"})
    assert meta.cid == cid
    assert "cid" not in meta.extra
    assert fmt.decode_meta({"cid": "not a cid!"}).cid is None
    assert fmt.decode_meta({"cid": ""}).cid is None


def test_for_new_content_drops_what_described_old_bytes() -> None:
    meta = fmt.decode_meta({"cid": "bafy1", "md5chksum": "XrY7u+Ae7tCTyyK7j1rNww==", "k": "v"})
    fresh = meta.for_new_content()
    assert fresh.cid is None
    assert fresh.extra == {"k": "v"}
    assert meta.extra["md5chksum"]  # the original is unchanged (frozen)


# --- times ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1354040105", 1_354_040_105 * NS),
        ("1354040105.5", 1_354_040_105_500_000_000),  # rclone drops trailing zeros
        ("1354040105.500000000", 1_354_040_105_500_000_000),
        ("1354040105.123456789", 1_354_040_105_123_456_789),
        ("1354040105.1234567891", 1_354_040_105_123_456_789),  # cut, as rclone does
        ("1354040105.", 1_354_040_105 * NS),
        ("+5", 5 * NS),
        ("-315619140", -315_619_140 * NS),  # s3fs's own negative-time test value
        ("-1.5", -1_500_000_000),  # rclone's decimal spelling
        ("-0.25", -250_000_000),
        ("-0.250000000", -250_000_000),  # zero seconds: always decimal
        ("-2.500000000", -1_500_000_000),  # s3fs timespec spelling
        ("0", 0),
        ("00000000001", NS),
        ("2012-11-27T18:15:05.5Z", 1_354_040_105_500_000_000),
        ("2012-11-27T18:15:05Z", 1_354_040_105 * NS),
        ("2012-11-27t18:15:05z", 1_354_040_105 * NS),
        ("2012-11-27T19:15:05.123456789+01:00", 1_354_040_105_123_456_789),
        ("2012-11-27T17:15:05-01:00", 1_354_040_105 * NS),
        ("1960-01-01T00:00:00.25Z", -315_619_199_750_000_000),
        ("2016-12-31T23:59:60Z", 1_483_228_799 * NS),  # leap second reads as :59
        ("2024-02-29T00:00:00Z", 1_709_164_800 * NS),
    ],
)
def test_parse_time(text: str, ns: int) -> None:
    assert fmt.parse_time_ns(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "1e9",
        "1.7e9",
        "inf",
        "nan",
        "-",
        ".5",
        "1.2.3",
        "1_000",
        "١٢٣",  # Arabic-Indic digits: int() would take them
        "0x10",
        "9" * 19,  # beyond int64 nanoseconds
        "-" + "9" * 19,
        "1" * 5000,  # huge: refused before int() sees it
        "2023-02-30T00:00:00Z",
        "2023-13-01T00:00:00Z",
        "2023-01-01T24:00:00Z",
        "2023-01-01T00:00:00",  # no zone
        "2023-01-01T00:00:00+25:00",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",  # beyond int64 nanoseconds
        "Mon, 03 Feb 2020 04:05:06 GMT",
    ],
)
def test_parse_time_garbage_is_none(text: str) -> None:
    assert fmt.parse_time_ns(text) is None


def test_time_round_trip_many_values() -> None:
    rng = random.Random(1234)
    values = [0, 1, -1, 2**63 - 1, -(2**63)] + [rng.randrange(-(2**63), 2**63) for _ in range(2000)]
    for ns in values:
        assert fmt.parse_time_ns(fmt.format_time_ns(ns)) == ns


# --- ids and modes: garbage ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", " ", "-1", "+5", "abc", "1.0", "4294967295", "4294967296", "99999999999", "0x10", "١"],
)
def test_parse_id_garbage(text: str) -> None:
    assert fmt.parse_id(text) is None


def test_parse_id_limits() -> None:
    assert fmt.parse_id("0") == 0
    assert fmt.parse_id("4294967294") == 4294967294
    assert fmt.parse_id(" 1000 ") == 1000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-1",
        "-33188",
        "abc",
        "1e5",
        "0o644",
        "0x",
        "0xzz",
        "0x30000",  # no such file type
        "99999999",
        "0999",  # leading zero means octal: 9 is not an octal digit
        "196608",  # 0o600000: beyond st_mode
        "12345678901234567890",
        "3" * 5000,
        "٣٣١٨٨",  # non-ASCII digits
        "33188.0",
    ],
)
def test_parse_mode_garbage(text: str) -> None:
    assert fmt.parse_mode(text) is None


def test_parse_octal_mode() -> None:
    assert fmt.parse_octal_mode("100644") == 0o100644
    assert fmt.parse_octal_mode("0755") == 0o755
    assert fmt.parse_octal_mode("8") is None
    assert fmt.parse_octal_mode("777777") is None


# --- hostile metadata never raises ---------------------------------------------------


class _Exploding(Mapping[str, str]):
    def __getitem__(self, key: str) -> str:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1


def test_decode_garbage_values_are_ignored() -> None:
    meta = fmt.decode_meta(
        {
            "mode": "-1",
            "uid": "root",
            "gid": "-5",
            "mtime": "NaN",
            "ctime": "9" * 400,
            "atime": "\x00",
            "xattr": "%7B%22user.a%22",
            "cid": "\r\n",
        }
    )
    assert meta == ObjectMeta()


def test_decode_odd_mapping_types() -> None:
    assert fmt.decode_meta({}) == ObjectMeta()
    assert fmt.decode_meta(_Exploding()) == ObjectMeta()
    odd: dict = {1: "2", "mode": b"33188", "uid": None, b"gid": "1", "mtime": "5"}
    meta = fmt.decode_meta(odd)
    assert meta == ObjectMeta(mtime_ns=5 * NS)


def test_decode_random_garbage_never_raises() -> None:
    rng = random.Random(4321)
    alphabet = '0123456789.-+:TZe%{}",=/ abcxyz\u00e9\x00\udcff'
    keys = ["mode", "uid", "gid", "mtime", "ctime", "atime", "xattr", "cid", "permissions"]
    for _ in range(3000):
        md = {
            rng.choice(keys): "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
            for _ in range(rng.randrange(1, 5))
        }
        meta = fmt.decode_meta(md)
        assert meta.mode is None or 0 <= meta.mode <= 0o177777
        fmt.encode_meta(meta)  # whatever was accepted can be written back


# --- xattrs --------------------------------------------------------------------------


def test_xattr_header_matches_s3fs_exactly() -> None:
    # raw '{"user.k":"dg=="}' URL-encoded like s3fs's urlEncodePath
    assert fmt.encode_xattrs({"user.k": b"v"}) == "%7B%22user.k%22%3A%22dg%3D%3D%22%7D"


def test_xattr_header_sorted_and_keeps_slash() -> None:
    header = fmt.encode_xattrs({"user.b": b"\xff\xff\xff", "user.a": b"?>?"})
    assert header is not None
    assert unquote(header) == '{"user.a":"Pz4/","user.b":"////"}'
    assert "/" in header and "%2F" not in header


def test_xattr_empty_means_no_header() -> None:
    assert fmt.encode_xattrs({}) is None
    assert "xattr" not in fmt.encode_meta(ObjectMeta(xattrs={}))


def test_xattr_round_trip_binary_and_non_ascii() -> None:
    xattrs = {
        "user.名前": "värde ✓".encode(),
        "user.empty": b"",
        "user.bin": bytes(range(256)),
        "user.with space{}": b"x",
        "security.selinux": b"system_u:object_r:x\x00",
        "system.posix_acl_access": b"\x02\x00\x00\x00",
        "user.surrogate\udcff": b"raw name byte",
    }
    out = fmt.encode_meta(ObjectMeta(xattrs=xattrs))
    assert fmt.decode_meta(out).xattrs == xattrs


def test_xattr_names_s3fs_cannot_parse_are_skipped() -> None:
    xattrs = {"user.a,b": b"1", "user.a:b": b"2", 'user."q"': b"3", "": b"4", "user.ok": b"5"}
    assert fmt.decode_xattrs(fmt.encode_xattrs(xattrs) or "") == {"user.ok": b"5"}
    for name in xattrs:
        assert fmt.valid_xattr_name(name) == (name == "user.ok")
    assert not fmt.valid_xattr_name("user." + "x" * 251)
    assert fmt.valid_xattr_name("user." + "x" * 250)
    assert not fmt.valid_xattr_name("user.\x00")


def _s3fs_header(raw: str) -> str:
    return quote(raw, safe="/~")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"user.k":"dg=="}', {"user.k": b"v"}),
        ('{"user.a":"","user.b":"Yg=="}', {"user.a": b"", "user.b": b"b"}),
        ("{user.k:dg==}", {"user.k": b"v"}),  # s3fs accepts unquoted tokens
        ('{"user.k":"dg"}', {"user.k": b"v"}),  # missing padding
        ('  {"user.k":"dg=="}  ', {"user.k": b"v"}),
        ('{"user.k":"dg==","bad pair","user.z":"eg=="}', {"user.k": b"v", "user.z": b"z"}),
        ('{"user.k":"!!!!"}', {}),  # not base64
        ('{"user.k":"dg=="', {}),  # no closing brace
        ('"user.k":"dg=="}', {}),
        ("{}", {}),
        ("", {}),
        ("%ZZ", {}),
        ('{"":"dg=="}', {}),
        ('{"user.k":"d"g=="}', {}),  # a quote inside the value
        ('{"system.posix_acl_access":"AgAAAA=="}', {"system.posix_acl_access": b"\x02\0\0\0"}),
    ],
)
def test_decode_xattrs_like_s3fs(raw: str, expected: dict[str, bytes]) -> None:
    assert fmt.decode_xattrs(_s3fs_header(raw)) == expected


def test_decode_xattrs_refuses_huge_header() -> None:
    assert fmt.decode_xattrs("%7B" + "a" * (2 << 20) + "%7D") == {}


def test_metadata_size_counts_utf8_of_keys_and_values() -> None:
    assert fmt.metadata_size({"mode": "33188", "k": "é"}) == 4 + 5 + 1 + 2
    big = fmt.encode_meta(ObjectMeta(xattrs={"user.big": b"x" * 2000}))
    assert fmt.metadata_size(big) > fmt.MAX_USER_METADATA_BYTES


# --- names and keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("a b", True),
        (".hidden", True),
        ("...", True),
        ("x_$folder$", True),  # a valid name; its key is what means "folder"
        ("é" * 127, True),  # 254 bytes
        ("a" * 255, True),
        ("a" * 256, True),  # FUSE passes it, S3 holds it: no reason to hide it
        ("é" * 128, True),  # 256 bytes
        ("a" * 1024, True),
        ("a" * 1025, False),  # longer than any S3 key
        ("é" * 513, False),  # 1,026 bytes
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("/", False),
        ("a\x00b", False),
        ("bad\udcff", False),  # not UTF-8 encodable: cannot be an S3 key
    ],
)
def test_valid_name(name: str, ok: bool) -> None:
    assert fmt.valid_name(name) is ok


def test_key_fits_counts_utf8_bytes() -> None:
    assert fmt.NAME_MAX == fmt.KEY_MAX == 1024
    assert fmt.key_fits("a/" + "b" * 1022)
    assert not fmt.key_fits("a/" + "b" * 1023)
    assert fmt.key_fits("é" * 512) and not fmt.key_fits("é" * 512 + "x")
    assert not fmt.key_fits("bad\udcff")


def test_normalize_prefix() -> None:
    assert fmt.normalize_prefix("") == ""
    assert fmt.normalize_prefix("/") == ""
    assert fmt.normalize_prefix("a") == "a/"
    assert fmt.normalize_prefix("/a/b/") == "a/b/"
    for bad in ("a//b", "a/../b", "./a", "a/\x00"):
        with pytest.raises(ValueError):
            fmt.normalize_prefix(bad)


def test_make_key() -> None:
    assert fmt.make_key("", ["a", "b"]) == "a/b"
    assert fmt.make_key("p/", ["a", "b"], marker=True) == "p/a/b/"
    assert fmt.make_key("p/", [], marker=True) == "p/"
    assert fmt.make_key("", [], marker=True) == "/"  # s3fs keeps the bucket root's attrs here
    with pytest.raises(ValueError):
        fmt.make_key("", ["a", ".."])


@pytest.mark.parametrize(
    ("prefix", "key", "expected"),
    [
        ("", "a/b.txt", (("a", "b.txt"), "object")),
        ("", "a/b/", (("a", "b"), "marker")),
        ("", "a/b_$folder$", (("a", "b"), "folder")),
        ("", "/", ((), "marker")),
        ("p/", "p/", ((), "marker")),
        ("p/", "p/x", (("x",), "object")),
        ("p/", "q/x", None),
        ("p/", "p", None),
        ("", "a//b", None),
        ("", "a/./b", None),
        ("", "a/../b", None),
        ("", "../etc/passwd", None),
        ("", "a//", None),
        ("", "//", None),
        ("", "_$folder$", None),
        ("", "x" * 256, (("x" * 256,), "object")),
        ("", "a/" + "é" * 128 + "/b", (("a", "é" * 128, "b"), "object")),
        ("", "x" * 1025, None),
    ],
)
def test_split_key(prefix: str, key: str, expected: tuple | None) -> None:
    got = fmt.split_key(prefix, key)
    assert (None if got is None else (got.parts, got.kind)) == expected


def test_split_key_inverts_make_key() -> None:
    parts = ["dir", "sub dir", "ファイル.txt"]
    assert fmt.split_key("m/", fmt.make_key("m/", parts)) == (tuple(parts), "object")
    assert fmt.split_key("m/", fmt.make_key("m/", parts, marker=True)) == (tuple(parts), "marker")


@pytest.mark.parametrize(
    ("dir_prefix", "entry", "expected"),
    [
        ("d/", "d/f.txt", ("f.txt", "file")),
        ("d/", "d/sub/", ("sub", "dir")),
        ("d/", "d/old_$folder$", ("old", "dir")),
        ("d/", "d/", None),  # the directory's own marker
        ("", "/", None),  # the bucket root's s3fs marker
        ("d/", "d//", None),
        ("d/", "d/_$folder$", None),
        ("d/", "d/..", None),
        ("d/", "d/.", None),
        ("d/", "e/x", None),
        ("d/", "d/a/b", None),  # nested: not a child
        ("d/", "d/" + "x" * 256, ("x" * 256, "file")),
        ("d/", "d/" + "x" * 1025, None),
    ],
)
def test_classify_child(dir_prefix: str, entry: str, expected: tuple | None) -> None:
    assert fmt.classify_child(dir_prefix, entry) == expected


def test_markers_and_hidden_keys() -> None:
    assert fmt.is_dir_marker_key("a/")
    assert fmt.is_dir_marker_key("/")
    assert not fmt.is_dir_marker_key("a")
    assert fmt.legacy_folder_name("x_$folder$") == "x"
    assert fmt.legacy_folder_name("_$folder$") == ""  # hidden, and names nothing
    assert fmt.is_hidden_key("d/_$folder$")
    assert fmt.legacy_folder_name("x") is None
    assert fmt.is_hidden_key("a/b_$folder$")
    assert fmt.is_hidden_key("a/b/")
    assert not fmt.is_hidden_key("a/b")


def test_looks_like_dir_object() -> None:
    assert fmt.looks_like_dir_object("application/x-directory", None, 0)
    assert fmt.looks_like_dir_object("httpd/unix-directory; charset=x", None, 0)
    assert fmt.looks_like_dir_object("application/octet-stream", 0o40755, 0)
    assert not fmt.looks_like_dir_object("application/x-directory", None, 3)
    assert not fmt.looks_like_dir_object("text/plain", 0o100644, 0)
    assert not fmt.looks_like_dir_object(None, None, 0)


# --- modes ---------------------------------------------------------------------------


def test_default_mode() -> None:
    assert fmt.default_mode("file", 0o022) == stat.S_IFREG | 0o644
    assert fmt.default_mode("dir", 0o022) == stat.S_IFDIR | 0o755
    assert fmt.default_mode("file", 0o077) == stat.S_IFREG | 0o600
    assert fmt.default_mode("dir", 0o027) == stat.S_IFDIR | 0o750
    assert fmt.default_mode("symlink", 0o777) == fmt.LINK_MODE
    with pytest.raises(ValueError):
        fmt.default_mode("fifo", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "kind", "expected"),
    [
        (None, "file", stat.S_IFREG | 0o644),
        (None, "dir", stat.S_IFDIR | 0o755),
        (0o755, "dir", stat.S_IFDIR | 0o755),  # s3fs mkdir: no type bits
        (0o100644, "dir", stat.S_IFDIR | 0o644),  # a dir/ marker is a dir, whatever it says
        (0o640, "file", stat.S_IFREG | 0o640),
        (0o40755, "file", stat.S_IFREG | 0o755),
        (0o10644, "file", stat.S_IFIFO | 0o644),  # s3fs mknod keeps its type
        (0o104755, "file", stat.S_IFREG | 0o4755),
        (0o100644, "symlink", fmt.LINK_MODE),
    ],
)
def test_resolve_mode(mode: int | None, kind: fmt.Kind, expected: int) -> None:
    assert fmt.resolve_mode(mode, kind, 0o022) == expected


# --- symlinks ------------------------------------------------------------------------


def test_symlink_like_s3fs() -> None:
    body, meta = fmt.encode_symlink(b"../target name", 1000, 100, 1_700_000_000 * NS)
    assert body == b"../target name"
    assert fmt.encode_meta(meta) == {
        "mode": "41471",
        "uid": "1000",
        "gid": "100",
        "mtime": "1700000000",
        "ctime": "1700000000",
        "atime": "1700000000",
    }
    assert fmt.decode_symlink(body) == b"../target name"
    assert fmt.LINK_CONTENT_TYPE == "application/octet-stream"


@pytest.mark.parametrize("target", [b"", b"a\x00b", b"x" * 4096])
def test_symlink_invalid_targets(target: bytes) -> None:
    with pytest.raises(ValueError):
        fmt.encode_symlink(target, 0, 0, 0)
    assert fmt.decode_symlink(target) is None


def test_symlink_target_bytes_are_kept_exactly() -> None:
    for target in (b" lead and trail ", b"\xff\xfe not utf-8", b"x" * 4095, "ü/€".encode()):
        body, _ = fmt.encode_symlink(target, 0, 0, 0)
        assert fmt.decode_symlink(body) == target


# --- content types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ctype"),
    [
        ("a.txt", "text/plain"),
        ("A.TXT", "text/plain"),
        ("dir/page.html", "text/html"),
        ("x.json", "application/json"),
        ("x.png", "image/png"),
        ("x.tar.gz", "application/gzip"),  # never a Content-Encoding
        ("x.gz", "application/gzip"),
        ("x.tar.bz2", "application/x-bzip2"),
        ("x.tar.xz", "application/x-xz"),
        ("Makefile", "application/octet-stream"),
        ("x.unknownext", "application/octet-stream"),
        (".bashrc", "application/octet-stream"),
        ("dir/", "application/x-directory"),
    ],
)
def test_guess_content_type(name: str, ctype: str) -> None:
    assert fmt.guess_content_type(name) == ctype


def test_content_type_base() -> None:
    assert fmt.content_type_base("Text/Plain; charset=utf-8") == "text/plain"
    assert fmt.content_type_base(None) == ""
