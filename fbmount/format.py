"""The on-bucket format: how a POSIX tree is spelled as S3 keys, headers and bodies.

Pure functions only (stdlib, no I/O), so every path that reads or writes the bucket spells
things the same way and the rules can be unit-tested on their own.

The format is s3fs-fuse's, so a tree written by fbmount reads right in s3fs and back:

* User metadata travels as the dict boto gives as ``Metadata`` (keys lower-case, without
  ``x-amz-meta-``). s3fs writes ``mode`` (decimal ``st_mode`` with the type bits, 0644
  file → ``"33188"``), ``uid``/``gid`` (decimal) and ``mtime``/``ctime``/``atime`` (epoch
  seconds: ``"1700000000"``, or with exactly nine fraction digits
  ``"1700000000.123456789"``), and user xattrs in ``xattr`` (see :func:`encode_xattrs`).
* A directory is a zero-byte object ``dir/`` with Content-Type ``application/x-directory``;
  s3fs/hadoop ``dir_$folder$`` keys and bare prefixes are directories too.
* A symlink is an object whose body is the target, ``mode`` ``S_IFLNK|0777`` (``"41471"``).
* A FIFO, socket or device (``mknod``) is an empty object whose ``mode`` carries the type
  bits (FIFO 0644 → ``"4516"``), as s3fs's ``mknod`` writes it. s3fs stores no device
  number; fbmount adds ``rdev`` (decimal ``st_rdev``, the header GeeseFS uses) for
  character and block devices.

Reading is tolerant: rclone's forms (octal ``mode`` such as ``"100644"``, ``mtime`` with
trailing zeros dropped such as ``"1354040105.5"``, RFC 3339 ``atime``), and the legacy
s3sync / GCS keys are understood. Anything unparsable is ignored, never raised: a hostile
header must never crash the daemon. Writing is strict and always ASCII.

Keys that cannot be file names (see :func:`valid_name`): a key with an empty, ``.`` or
``..`` segment (``a//b``, ``a/./b``), or a NUL, is skipped in listings and never followed
— nothing under it is reachable through the mount, and the mount never creates such a key.
A segment may be as long as a key (:data:`NAME_MAX`, 1,024 bytes): Linux passes FUSE
names longer than 255 bytes, and S3 keys written by other tools may hold them.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import mimetypes
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Literal, NamedTuple
from urllib.parse import quote_from_bytes, unquote_to_bytes

# --- constants -----------------------------------------------------------------------

DIR_CONTENT_TYPE = "application/x-directory"
#: Content-Types that mark a zero-byte object as a directory (s3fs also accepts Nextcloud's).
DIR_CONTENT_TYPES = frozenset({"application/x-directory", "httpd/unix-directory"})
#: s3fs writes every symlink with this static Content-Type.
LINK_CONTENT_TYPE = "application/octet-stream"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

#: s3fs/hadoop legacy directory marker: ``name_$folder$`` stands for directory ``name``.
FOLDER_SUFFIX = "_$folder$"
#: rclone ``--links`` stores a symlink ``name`` as the object ``name.rclonelink``.
RCLONE_LINK_SUFFIX = ".rclonelink"

KEY_MAX = 1024  #: bytes of UTF-8 in an S3 key
#: bytes of UTF-8 in one path segment: as long as a key may be (the kernel passes FUSE
#: names up to PATH_MAX; Linux's own NAME_MAX of 255 binds disk filesystems, not FUSE)
NAME_MAX = KEY_MAX
SYMLINK_MAX = 4095  #: bytes in a symlink target (PATH_MAX - 1)
XATTR_NAME_MAX = 255  #: bytes in an xattr name (Linux XATTR_NAME_MAX)
XATTR_SIZE_MAX = 65536  #: bytes in one xattr value (Linux XATTR_SIZE_MAX)
#: AWS S3 caps user metadata at 2 KiB (sum of UTF-8 bytes of keys and values); see
#: :func:`metadata_size`. Other servers are looser, but a tree should stay portable.
MAX_USER_METADATA_BYTES = 2048

#: ``mode`` of every symlink s3fs writes.
LINK_MODE = stat.S_IFLNK | 0o777

# Keys fbmount owns when it writes; everything else read from an object is kept in
# ObjectMeta.extra and written back unchanged on a metadata-only update.
KEY_MODE, KEY_UID, KEY_GID = "mode", "uid", "gid"
KEY_MTIME, KEY_CTIME, KEY_ATIME = "mtime", "ctime", "atime"
KEY_XATTR = "xattr"
KEY_RDEV = "rdev"  # device number of a character or block device (GeeseFS's key)
KEY_CID = "cid"  # set by Filebase (the IPFS CID of the content): read, never written
OWNED_KEYS = frozenset(
    {KEY_MODE, KEY_UID, KEY_GID, KEY_MTIME, KEY_CTIME, KEY_ATIME, KEY_XATTR, KEY_RDEV}
)
# Read as fallbacks (s3fs reads them too), consumed, and never written back.
_LEGACY_KEYS = frozenset(
    {
        "permissions",  # s3sync: mode
        "owner",  # s3sync: uid
        "group",  # s3sync: gid
        "goog-reserved-posix-mode",  # gsutil: octal mode
        "goog-reserved-posix-uid",
        "goog-reserved-posix-gid",
        "goog-reserved-file-mtime",  # gsutil: integer seconds
    }
)
_CONSUMED_KEYS = OWNED_KEYS | _LEGACY_KEYS | {KEY_CID}
#: Keys another tool derived from the bytes (rclone's MD5 for multipart uploads): they
#: must not survive a write of new content. See :meth:`ObjectMeta.for_new_content`.
CONTENT_BOUND_KEYS = frozenset({"md5chksum"})

_VALID_TYPES = frozenset(
    {
        0,
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
        stat.S_IFCHR,
        stat.S_IFBLK,
    }
)
_MODE_MAX = 0o177777
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "no owner" to chown, never a real owner
_RDEV_MAX = 0xFFFFFFFF  # FUSE carries st_rdev in 32 bits
#: File types that are a name, a mode and (devices) a number: no body.
SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})
_NS = 1_000_000_000
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1  # what int64 nanoseconds (Go, statx) can hold
_FIELD_MAX = 64  # longest scalar header value worth parsing
_XATTR_HEADER_MAX = 1 << 20  # longest xattr header worth parsing (S3 caps it at 2 KiB)

Kind = Literal["file", "dir", "symlink"]


# --- the metadata record -------------------------------------------------------------


@dataclass(frozen=True)
class ObjectMeta:
    """What an object's user metadata says about the file it stands for.

    None means "the object does not say" (the caller falls back to defaults or to
    Last-Modified). ``mode`` is the full ``st_mode``; it may lack type bits when the writer
    left them out (s3fs stores ``mkdir`` modes as bare permissions): see
    :func:`resolve_mode`. ``xattrs`` maps full names (``"user.color"``) to values; names
    are str decoded with ``surrogateescape``. Treat the dicts as read-only.
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    atime_ns: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    #: ``st_rdev`` of a character or block device (``rdev``); None: not recorded.
    rdev: int | None = None
    #: Filebase's IPFS CID of the content; read-only, :func:`encode_meta` never writes it
    #: (a copied or rewritten object gets a fresh one from the server).
    cid: str | None = None
    #: Keys fbmount does not interpret (rclone's ``btime``, ``md5chksum``, user keys of
    #: other tools), kept verbatim so a chmod/utime does not erase them.
    extra: dict[str, str] = field(default_factory=dict)

    def for_new_content(self) -> ObjectMeta:
        """This metadata minus what described the old bytes (use when uploading new data)."""
        kept = {k: v for k, v in self.extra.items() if k not in CONTENT_BOUND_KEYS}
        return replace(self, cid=None, extra=kept)


# --- numbers and times ---------------------------------------------------------------

_INT_RE = re.compile(r"[0-9]+")
_DEC_TIME_RE = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?")
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def _valid_mode(value: int) -> bool:
    return 0 <= value <= _MODE_MAX and stat.S_IFMT(value) in _VALID_TYPES


def _plausible(value: int) -> bool:
    """Could a real file have this st_mode? (Linux symlinks are always 0777.)"""
    return stat.S_IFMT(value) != stat.S_IFLNK or stat.S_IMODE(value) == 0o777


def parse_mode(text: str) -> int | None:
    """``st_mode`` from a ``mode`` header: s3fs decimal or rclone octal; None if garbage.

    Rule, in order: ``0x…`` is hex and ``0…`` octal (C ``strtol`` base 0, which is how
    s3fs reads the key); a value with an 8 or 9 is decimal; a value that is a valid
    ``st_mode`` only when read as octal is octal (rclone's ``"100644"``, ``"40755"``,
    ``"120777"``). When both readings are valid, decimal wins (s3fs writes decimal and
    reads every such value as decimal) unless it is implausible while octal is not: a
    symlink whose permissions are not 0777, or setuid/setgid/sticky bits that the octal
    reading does not have (``"644"`` is 0o644, not 0o1204). s3fs's ``"41471"`` (symlink)
    and ``"4516"`` (fifo) stay decimal; rclone's ``"42775"`` (setgid dir) and ``"10644"``
    (fifo) read as octal.
    """
    s = text.strip()
    if not s or len(s) > _FIELD_MAX or not s.isascii():
        return None
    low = s.lower()
    try:
        if low.startswith("0x") and len(s) > 2 and all(c in "0123456789abcdef" for c in low[2:]):
            value = int(low[2:], 16)
            return value if _valid_mode(value) else None
        if not _INT_RE.fullmatch(s):
            return None
        if len(s) > 1 and s[0] == "0":
            value = int(s, 8)  # raises on 8/9, like strtol stopping short (s3fs → 0)
            return value if _valid_mode(value) else None
    except ValueError:
        return None
    dec = int(s, 10)
    oct_ = int(s, 8) if all(c in "01234567" for c in s) else None
    dec_ok = _valid_mode(dec)
    oct_ok = oct_ is not None and _valid_mode(oct_)
    if dec_ok and oct_ok:
        assert oct_ is not None
        dec_odd = not _plausible(dec) or (bool(dec & 0o7000) and not oct_ & 0o7000)
        oct_odd = not _plausible(oct_)
        return oct_ if dec_odd and not oct_odd else dec
    if dec_ok:
        return dec
    if oct_ok:
        return oct_
    return None


def parse_octal_mode(text: str) -> int | None:
    """An always-octal mode (gsutil's ``goog-reserved-posix-mode``); None if garbage."""
    s = text.strip()
    if not s or len(s) > _FIELD_MAX or not all(c in "01234567" for c in s):
        return None
    value = int(s, 8)
    return value if _valid_mode(value) else None


def parse_id(text: str) -> int | None:
    """A uid/gid: a decimal in 0..2**32-2; None if garbage (negative, huge, not a number)."""
    s = text.strip()
    if not s or len(s) > 10 or not _INT_RE.fullmatch(s):
        return None
    value = int(s)
    return value if value <= _ID_MAX else None


def parse_rdev(text: str) -> int | None:
    """A device number (``rdev``): a decimal in 0..2**32-1; None if garbage."""
    s = text.strip()
    if not s or len(s) > 10 or not _INT_RE.fullmatch(s):
        return None
    value = int(s)
    return value if value <= _RDEV_MAX else None


def parse_time_ns(text: str) -> int | None:
    """Epoch nanoseconds from a time header; None if garbage or beyond int64 nanoseconds.

    Accepted: ``"1700000000"``; ``"1700000000.123456789"`` (s3fs); ``"1354040105.5"``
    (rclone drops trailing zeros; digits past nine are cut, as rclone does); RFC 3339
    (``"2012-11-27T18:15:05.5Z"``, rclone's ``atime``/``btime`` with ``-M``).

    Negative times differ between the two writers: s3fs prints a ``timespec`` as
    ``tv_sec.tv_nsec`` with ``tv_sec`` rounded down, so -0.25 s after -100 is
    ``"-101.750000000"``; rclone prints the plain decimal ``"-100.25"``. A negative value
    with exactly nine fraction digits and a non-zero integer part is read the s3fs way
    (seconds + fraction; rclone only prints nine digits when the last is not 0), any other
    the decimal way.
    """
    s = text.strip()
    if not s or len(s) > _FIELD_MAX:
        return None
    m = _DEC_TIME_RE.fullmatch(s)
    if m is not None:
        sign, whole, frac = m.group(1), int(m.group(2)), m.group(3) or ""
        frac_ns = int((frac[:9]).ljust(9, "0"))
        if sign == "-":
            if len(frac) == 9 and whole != 0:
                ns = -whole * _NS + frac_ns
            else:
                ns = -(whole * _NS + frac_ns)
        else:
            ns = whole * _NS + frac_ns
        return ns if _NS_MIN <= ns <= _NS_MAX else None
    return _parse_rfc3339_ns(s)


def _parse_rfc3339_ns(s: str) -> int | None:
    m = _RFC3339_RE.fullmatch(s)
    if m is None:
        return None
    year, month, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    if year < 1 or not 1 <= month <= 12 or hour > 23 or minute > 59 or sec > 60:
        return None
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    # A leap second (:60) is read as :59, as most clocks and Go's parser would show it.
    secs = calendar.timegm((year, month, day, hour, minute, min(sec, 59), 0, 0, 0))
    if m.group(8) is None:  # numeric offset: local time = UTC + offset
        off_h, off_m = int(m.group(10)), int(m.group(11))
        if off_h > 23 or off_m > 59:
            return None
        offset = off_h * 3600 + off_m * 60
        secs -= offset if m.group(9) == "+" else -offset
    frac = m.group(7) or ""
    ns = secs * _NS + int(frac[:9].ljust(9, "0"))
    return ns if _NS_MIN <= ns <= _NS_MAX else None


def format_time_ns(ns: int) -> str:
    """s3fs's spelling of a time: integer seconds, or seconds and a 9-digit fraction.

    Seconds are rounded down and the fraction is non-negative (a ``timespec``), so
    -1.5 s is ``"-2.500000000"``, exactly what s3fs writes and reads back.
    """
    if not isinstance(ns, int) or isinstance(ns, bool) or not _NS_MIN <= ns <= _NS_MAX:
        raise ValueError(f"time out of range: {ns!r}")
    sec, frac = divmod(ns, _NS)
    return str(sec) if frac == 0 else f"{sec}.{frac:09d}"


# --- xattrs --------------------------------------------------------------------------

# Bytes that break s3fs's hand-rolled parser ({"name":"b64",...} split on ',' and ':').
_XATTR_NAME_FORBIDDEN = frozenset(b'",:\x00')


def valid_xattr_name(name: str) -> bool:
    """True if `name` can be stored in s3fs's xattr header (refuse others with ENOTSUP).

    s3fs splits the header on ``,`` and ``:`` and strips ``"``, so a name holding one of
    them would come back wrong (or not at all) in s3fs and here.
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return 0 < len(raw) <= XATTR_NAME_MAX and not _XATTR_NAME_FORBIDDEN.intersection(raw)


#: xattr namespaces that mean something to the kernel (security.* for LSMs and file
#: capabilities, system.* for ACLs, trusted.* for overlayfs and other privileged users):
#: never set through the mount, and never shown from a header another tool wrote (the
#: names stay in the header, untouched). Every other name the kernel passes is stored,
#: ``user.*`` and names without a namespace alike (s3fs stores whatever it is given).
KERNEL_XATTR_PREFIXES = ("security.", "system.", "trusted.")


def user_xattr(name: str) -> bool:
    """Is `name` an xattr users own through the mount (stored, listed, read, written)?"""
    return isinstance(name, str) and not name.startswith(KERNEL_XATTR_PREFIXES)


def encode_xattrs(xattrs: Mapping[str, bytes]) -> str | None:
    """s3fs's ``x-amz-meta-xattr``: URL-encoded ``{"name":"base64",...}``; None if empty.

    Names go in raw (s3fs does not escape them), values as standard padded base64, the
    whole then percent-encoded like s3fs's ``urlEncodePath`` (RFC 3986 unreserved and
    ``/`` kept, upper-case hex), which makes it ASCII. Names sorted by bytes, as s3fs's
    ``std::map`` orders them. Names :func:`valid_xattr_name` refuses are skipped.
    """
    pairs: list[tuple[bytes, bytes]] = []
    for name, value in xattrs.items():
        if not isinstance(name, str) or not valid_xattr_name(name):
            continue
        pairs.append((name.encode("utf-8", "surrogateescape"), bytes(value)))
    if not pairs:
        return None
    pairs.sort()
    body = b",".join(b'"' + n + b'":"' + base64.b64encode(v) + b'"' for n, v in pairs)
    return quote_from_bytes(b"{" + body + b"}", safe="/~")


def _unquote_s3fs(token: bytes) -> bytes | None:
    """s3fs's ``takeout_str_dquart``: the text between the first and last ``"``."""
    if b'"' not in token:
        return token
    token = token[token.index(b'"') + 1 :]
    if b'"' not in token:
        return None
    token = token[: token.rindex(b'"')]
    return None if b'"' in token else token


def _b64decode(text: bytes) -> bytes | None:
    text = text.strip()
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_xattrs(header: str) -> dict[str, bytes]:
    """Parse s3fs's xattr header the way s3fs does; malformed pairs are skipped."""
    if not isinstance(header, str) or len(header) > _XATTR_HEADER_MAX:
        return {}
    try:
        raw = unquote_to_bytes(header)
    except (TypeError, ValueError):
        return {}
    start, end = raw.find(b"{"), raw.rfind(b"}")
    if start < 0 or end <= start:
        return {}
    out: dict[str, bytes] = {}
    for pair in raw[start + 1 : end].split(b","):
        if b":" not in pair:
            continue
        key_raw, _, val_raw = pair.partition(b":")
        key, val = _unquote_s3fs(key_raw), _unquote_s3fs(val_raw)
        if not key or val is None or b"\x00" in key or len(key) > XATTR_NAME_MAX:
            continue
        value = _b64decode(val)
        if value is None:
            continue
        out[key.decode("utf-8", "surrogateescape")] = value
    return out


# --- whole metadata ------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


def _header_safe(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def encode_meta(meta: ObjectMeta) -> dict[str, str]:
    """``Metadata`` for PutObject/CopyObject(REPLACE): s3fs's keys, ASCII values.

    Writes mode/uid/gid/times that are set, the xattr header when there are xattrs, and
    ``extra`` entries whose key is an HTTP token and whose value is printable ASCII (others
    could not travel as a header and are dropped). Never writes ``cid``. Raises ValueError
    for out-of-range numbers, which only a caller bug can produce.
    """
    out: dict[str, str] = {}
    for key, value in meta.extra.items():
        if (
            isinstance(key, str)
            and isinstance(value, str)
            and key not in _CONSUMED_KEYS
            and _TOKEN_RE.fullmatch(key)
            and _header_safe(value)
        ):
            out[key] = value
    if meta.mode is not None:
        if isinstance(meta.mode, bool) or not _valid_mode(meta.mode):
            raise ValueError(f"invalid st_mode: {meta.mode!r}")
        out[KEY_MODE] = str(meta.mode)
    for key, ident in ((KEY_UID, meta.uid), (KEY_GID, meta.gid)):
        if ident is not None:
            if isinstance(ident, bool) or not 0 <= ident <= _ID_MAX:
                raise ValueError(f"invalid {key}: {ident!r}")
            out[key] = str(ident)
    if meta.rdev is not None:
        if isinstance(meta.rdev, bool) or not 0 <= meta.rdev <= _RDEV_MAX:
            raise ValueError(f"invalid rdev: {meta.rdev!r}")
        out[KEY_RDEV] = str(meta.rdev)
    for key, ns in (
        (KEY_MTIME, meta.mtime_ns),
        (KEY_CTIME, meta.ctime_ns),
        (KEY_ATIME, meta.atime_ns),
    ):
        if ns is not None:
            out[key] = format_time_ns(ns)
    xattr = encode_xattrs(meta.xattrs)
    if xattr is not None:
        out[KEY_XATTR] = xattr
    return out


def _first(
    md: Mapping[str, str], keys: Iterable[str], parse: Callable[[str], int | None]
) -> int | None:
    for key in keys:
        value = md.get(key)
        if value is not None:
            parsed = parse(value)
            if parsed is not None:
                return parsed
    return None


def decode_meta(metadata: Mapping[str, str]) -> ObjectMeta:
    """Read an object's ``Metadata`` (s3fs, rclone, s3sync, gsutil forms); never raises.

    Keys are compared case-insensitively. A value that does not parse is ignored (the
    next fallback key is tried). Unknown keys land in ``extra``.
    """
    md: dict[str, str] = {}
    try:
        items = list(metadata.items())
    except Exception:  # a broken mapping is just "no metadata"
        items = []
    for key, value in items:
        if isinstance(key, str) and isinstance(value, str):
            md.setdefault(key.strip().lower(), value)
    mode = _first(md, (KEY_MODE, "permissions"), parse_mode)
    if mode is None:
        mode = _first(md, ("goog-reserved-posix-mode",), parse_octal_mode)
    uid = _first(md, (KEY_UID, "owner", "goog-reserved-posix-uid"), parse_id)
    gid = _first(md, (KEY_GID, "group", "goog-reserved-posix-gid"), parse_id)
    mtime = _first(md, (KEY_MTIME, "goog-reserved-file-mtime"), parse_time_ns)
    ctime = _first(md, (KEY_CTIME,), parse_time_ns)
    atime = _first(md, (KEY_ATIME,), parse_time_ns)
    xattrs = decode_xattrs(md[KEY_XATTR]) if KEY_XATTR in md else {}
    rdev = _first(md, (KEY_RDEV,), parse_rdev)
    cid = md.get(KEY_CID, "").strip()
    cid_ok = 0 < len(cid) <= 256 and cid.isascii() and cid.isalnum()
    extra = {k: v for k, v in md.items() if k not in _CONSUMED_KEYS}
    return ObjectMeta(
        mode=mode,
        uid=uid,
        gid=gid,
        mtime_ns=mtime,
        ctime_ns=ctime,
        atime_ns=atime,
        xattrs=xattrs,
        rdev=rdev,
        cid=cid if cid_ok else None,
        extra=extra,
    )


def metadata_size(metadata: Mapping[str, str]) -> int:
    """Bytes S3 counts against its 2 KiB user-metadata cap (UTF-8 of keys and values)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


# --- modes ---------------------------------------------------------------------------


def default_mode(kind: Kind, umask: int = 0o022) -> int:
    """``st_mode`` for an object that carries no mode (written by a plain S3 client)."""
    if kind == "dir":
        return stat.S_IFDIR | (0o755 & ~umask)
    if kind == "symlink":
        return LINK_MODE
    if kind == "file":
        return stat.S_IFREG | (0o644 & ~umask)
    raise ValueError(f"unknown kind: {kind!r}")


def resolve_mode(mode: int | None, kind: Kind, umask: int = 0o022) -> int:
    """The ``st_mode`` to show, given the header's mode and what the key structure says.

    `kind` is the caller's structural verdict (a ``dir/`` marker, prefix or legacy folder
    is a dir; a body with a symlink mode is a symlink). Missing mode → defaults; missing
    type bits (s3fs ``mkdir``) → filled from `kind`; a type that contradicts `kind`
    → `kind`'s type with the header's permission bits. Special files (fifo, socket,
    devices) recorded by s3fs ``mknod`` keep their type when `kind` is "file".
    """
    if mode is None:
        return default_mode(kind, umask)
    perms = stat.S_IMODE(mode)
    ftype = stat.S_IFMT(mode)
    if kind == "dir":
        return stat.S_IFDIR | perms
    if kind == "symlink":
        return LINK_MODE
    if ftype in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG):
        return ftype | perms
    return stat.S_IFREG | perms


def content_type_base(content_type: str | None) -> str:
    """``"text/plain; charset=utf-8"`` → ``"text/plain"`` (lower-case, no parameters)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def looks_like_dir_object(content_type: str | None, mode: int | None, size: int) -> bool:
    """Is a key *without* a trailing ``/`` an old-style s3fs (< 1.63) directory object?

    s3fs treats an empty object as a directory when its mode has S_IFDIR or its
    Content-Type is a directory type.
    """
    if size != 0:
        return False
    if mode is not None and stat.S_ISDIR(mode):
        return True
    return content_type_base(content_type) in DIR_CONTENT_TYPES


# --- names and keys ------------------------------------------------------------------


def valid_name(segment: str) -> bool:
    """Can `segment` be one path component, both as a file name and inside an S3 key?

    False for "", ".", "..", anything with "/" or NUL, more than :data:`NAME_MAX` (1,024)
    bytes of UTF-8, or text that is not encodable as UTF-8 (lone surrogates: S3 keys are
    UTF-8). Whether the whole key fits is :func:`key_fits`'s question.
    """
    if not isinstance(segment, str) or segment in ("", ".", "..") or "/" in segment:
        return False
    if "\x00" in segment:
        return False
    try:
        return len(segment.encode("utf-8")) <= NAME_MAX
    except UnicodeEncodeError:
        return False


def key_fits(key: str) -> bool:
    """Is `key` short enough to be an S3 key (:data:`KEY_MAX` bytes of UTF-8)?"""
    try:
        return len(key.encode("utf-8")) <= KEY_MAX
    except UnicodeEncodeError:
        return False


def normalize_prefix(prefix: str) -> str:
    """Mount prefix as a key prefix: ``"a/b"``/``"/a/b/"`` → ``"a/b/"``, root → ``""``.

    Raises ValueError when a segment is not a valid name (the mount refuses to start).
    """
    stripped = prefix.strip("/")
    parts = stripped.split("/") if stripped else []
    for p in parts:
        if not valid_name(p):
            raise ValueError(f"invalid segment {p!r} in prefix {prefix!r}")
    return "".join(p + "/" for p in parts)


def make_key(prefix: str, parts: Iterable[str], *, marker: bool = False) -> str:
    """Key of the path `parts` under normalized `prefix`; ``marker`` adds the ``/``.

    The root's marker under an empty prefix is ``"/"``, where s3fs keeps the bucket
    root's own attributes.
    """
    parts = list(parts)
    for p in parts:
        if not valid_name(p):
            raise ValueError(f"invalid name: {p!r}")
    if not parts:
        return (prefix or "/") if marker else prefix
    key = prefix + "/".join(parts)
    return key + "/" if marker else key


class KeyPath(NamedTuple):
    """A key seen through the mount: path components and what kind of object it is."""

    parts: tuple[str, ...]
    #: "object": plain key (file, symlink, or old-style s3fs dir — ask the metadata);
    #: "marker": ``dir/``; "folder": legacy ``dir_$folder$``.
    kind: Literal["object", "marker", "folder"]


def split_key(prefix: str, key: str) -> KeyPath | None:
    """Where `key` sits under normalized `prefix`; None if outside it or not nameable.

    The prefix's own marker (``prefix`` itself, or ``"/"`` for an empty prefix) is the
    root: ``KeyPath((), "marker")``.
    """
    if not isinstance(key, str) or not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest == "" and prefix:
        return KeyPath((), "marker")
    if rest == "/" and not prefix:
        return KeyPath((), "marker")
    kind: Literal["object", "marker", "folder"] = "object"
    if rest.endswith("/"):
        kind, rest = "marker", rest[:-1]
    elif rest.endswith(FOLDER_SUFFIX):
        kind, rest = "folder", rest[: -len(FOLDER_SUFFIX)]
    parts = tuple(rest.split("/"))
    if not all(valid_name(p) for p in parts):
        return None
    return KeyPath(parts, kind)


def legacy_folder_name(name: str) -> str | None:
    """``"x_$folder$"`` → ``"x"`` (a directory; the key itself is hidden), else None.

    A bare ``"_$folder$"`` gives ``""``: still a marker (hidden), but of no nameable
    directory, so :func:`valid_name` refuses it and the entry is skipped.
    """
    if isinstance(name, str) and name.endswith(FOLDER_SUFFIX):
        return name[: -len(FOLDER_SUFFIX)]
    return None


def is_dir_marker_key(key: str) -> bool:
    """A key ending in ``/`` stands for a directory, whatever its Content-Type or body."""
    return isinstance(key, str) and key.endswith("/")


def is_hidden_key(key: str) -> bool:
    """Keys that never show as entries of their own (markers and ``_$folder$`` objects)."""
    return is_dir_marker_key(key) or legacy_folder_name(key.rsplit("/", 1)[-1]) is not None


def classify_child(dir_prefix: str, entry: str) -> tuple[str, Literal["file", "dir"]] | None:
    """One entry of a delimiter LIST of `dir_prefix` → (name, "file"|"dir"); None = skip.

    `entry` is a Contents key or a CommonPrefix. Skipped: the directory's own marker,
    anything outside `dir_prefix` or nested, and names :func:`valid_name` refuses.
    ``x_$folder$`` gives ("x", "dir"). A "file" may still turn out to be a symlink or an
    old-style directory once its metadata is known.
    """
    if not isinstance(entry, str) or not entry.startswith(dir_prefix):
        return None
    rest = entry[len(dir_prefix) :]
    kind: Literal["file", "dir"] = "file"
    if rest.endswith("/"):
        kind, rest = "dir", rest[:-1]
    else:
        folder = legacy_folder_name(rest)
        if folder is not None:
            kind, rest = "dir", folder
    if not valid_name(rest):
        return None
    return rest, kind


# --- symlinks ------------------------------------------------------------------------


def valid_link_target(target: bytes) -> bool:
    """A symlink target fbmount can store: 1..4095 bytes, no NUL."""
    return (
        isinstance(target, bytes | bytearray)
        and 0 < len(target) <= SYMLINK_MAX
        and b"\0" not in target
    )


def encode_symlink(target: bytes, uid: int, gid: int, now_ns: int) -> tuple[bytes, ObjectMeta]:
    """Body and metadata of a new symlink object, as s3fs writes one.

    Raises ValueError for a target :func:`valid_link_target` refuses. Upload with
    :data:`LINK_CONTENT_TYPE`. (s3fs strips leading/trailing whitespace from targets when
    it reads them; fbmount keeps the bytes exactly.)
    """
    if not valid_link_target(target):
        raise ValueError(f"invalid symlink target: {target[:64]!r}")
    meta = ObjectMeta(
        mode=LINK_MODE, uid=uid, gid=gid, mtime_ns=now_ns, ctime_ns=now_ns, atime_ns=now_ns
    )
    return bytes(target), meta


def decode_symlink(body: bytes) -> bytes | None:
    """A symlink object's body → its target; None if it cannot be one (empty, NUL, huge).

    Callers should only fetch bodies up to :data:`SYMLINK_MAX` bytes.
    """
    return bytes(body) if valid_link_target(body) else None


def is_symlink_meta(meta: ObjectMeta) -> bool:
    """Does the object's metadata say "symlink" (s3fs ``41471`` or rclone ``120777``)?"""
    return meta.mode is not None and stat.S_ISLNK(meta.mode)


# --- content types -------------------------------------------------------------------

# mimetypes reports compression as an "encoding"; S3 must not get Content-Encoding for
# stored .gz files (clients would inflate them), so the compressed type is the type.
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


@cache
def _mime_db() -> mimetypes.MimeTypes:
    # Python's built-in table only: the same answer on every machine (no /etc/mime.types).
    return mimetypes.MimeTypes()


def guess_content_type(name: str) -> str:
    """Content-Type for a new object named `name` (a key or a bare name).

    Keys ending in ``/`` get :data:`DIR_CONTENT_TYPE`, like s3fs; unknown extensions get
    ``application/octet-stream``.
    """
    if name.endswith("/"):
        return DIR_CONTENT_TYPE
    base = name.rsplit("/", 1)[-1]
    ctype, encoding = _mime_db().guess_type(base, strict=False)
    if encoding is not None:
        return _ENCODING_TYPES.get(encoding, DEFAULT_CONTENT_TYPE)
    return ctype or DEFAULT_CONTENT_TYPE
