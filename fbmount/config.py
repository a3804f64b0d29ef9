"""Mount configuration: one dataclass, built from the command line and `-o` options.

Every long option can also be given as `-o name=value` so that /etc/fstab and the systemd
unit can say everything the command line can.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from fbmount import format as fmt
from fbmount.errors import StartupError

MIB = 1024 * 1024
DEFAULT_ENDPOINT = "https://s3.filebase.com"
# Without -o umask, the bucket's ACL picks the mode of objects that carry none (fs.py).
PUBLIC_UMASK = 0o022  # public-read bucket: world-readable
PRIVATE_UMASK = 0o027  # private bucket: owner and group only
DEFAULT_UMASK = 0o022  # ACL unknown (not supported, or not allowed to read it)


@dataclass(frozen=True)
class Provider:
    """What differs between S3 services; one place decides each quirk."""

    name: str
    endpoint: str | None
    addressing_style: str  # "path" or "virtual"
    max_rps: float  # client-side request-rate limit, 0 = none
    flexible_checksums: bool  # knows botocore's CRC32/CRC64 checksum headers


# Filebase documents 100 requests/s on older pages and 500 on newer ones: stay under the
# lower figure unless told otherwise (--max-rps). CopyObject and DeleteObjects are probed on
# first use for every provider (store.py), never assumed.
PROVIDERS = {
    "filebase": Provider("filebase", "https://s3.filebase.com", "path", 100.0, False),
    "aws": Provider("aws", None, "virtual", 0.0, True),
    "minio": Provider("minio", None, "path", 0.0, True),
    "seaweedfs": Provider("seaweedfs", None, "path", 0.0, False),
    "other": Provider("other", None, "path", 0.0, False),
}


def detect_provider(endpoint: str) -> str:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    if host.endswith(("filebase.com", "filebase.io")):
        return "filebase"
    if host.endswith("amazonaws.com"):
        return "aws"
    return "other"


# Generic mount(8)/fstab options that mean nothing to fbmount: accepted, ignored.
IGNORED_MOUNT_OPTIONS = {
    "_netdev",
    "nofail",
    "noauto",
    "auto",
    "user",
    "users",
    "nouser",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "async",
    "sync",
    "defaults",
    "rw",
    "delay_connect",
}


# `--consistency strict` is s3fs's contract in one switch: close() returns once the object
# is in S3, and a change made elsewhere shows at the next stat (attributes are always asked
# again, and a name missing from a cached listing is asked of S3: HEAD + LIST). Options
# given explicitly win over the preset.
CONSISTENCY_PRESETS: dict[str, dict[str, float]] = {
    "default": {},
    "strict": {"upload_delay": 0.0, "attr_ttl": 0.0, "dir_ttl": 1.0},
}


def apply_consistency(values: dict) -> None:
    """Fill the preset of `values["consistency"]` under the options given explicitly."""
    mode = values.get("consistency", "default")
    if mode not in CONSISTENCY_PRESETS:
        raise StartupError(f"--consistency must be default or strict, not {mode!r}")
    for key, value in CONSISTENCY_PRESETS[mode].items():
        values.setdefault(key, value)


@dataclass
class Config:
    bucket: str | None
    mountpoint: Path
    prefix: str = ""
    endpoint: str = DEFAULT_ENDPOINT
    region: str = "us-east-1"
    profile: str | None = None
    passwd_file: Path | None = None
    ca_bundle: Path | None = None
    provider: str = ""  # empty: detected from the endpoint
    max_rps: float | None = None  # None: the provider's default
    foreground: bool = False
    read_only: bool = False
    debug: bool = False
    cache_dir: Path | None = None
    consistency: str = "default"  # default | strict (CONSISTENCY_PRESETS)
    upload_delay: float = 2.0
    attr_ttl: float = 10.0
    dir_ttl: float = 10.0
    part_size: int = 8 * MIB
    read_ahead: int = 64 * MIB
    memory_limit: int = 128 * MIB  # read-ahead budget shared by all open files
    copy: str = "auto"  # auto | yes | no
    flush_timeout: float = 600.0  # how long unmount/SIGTERM waits for staged uploads
    local_dir: Path | None = None  # --local: serve a private SeaweedFS from this directory
    url_expiry: float = 3600.0  # seconds a user.fbmount.url pre-signed link stays valid
    parallel: int = 8
    retries: int = 5
    timeout: float = 120.0
    allow_other: bool = False
    default_permissions: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int | None = None  # None: from the bucket ACL
    fsname: str = ""
    extra_fuse_options: list[str] = field(default_factory=list)
    # Which of the bucket's cache directories this mount took (daemon.claim_state_dir):
    # 1 is NAME-DIGEST, n > 1 is NAME-DIGEST-n, used while another mount holds the first.
    state_instance: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.prefix = fmt.normalize_prefix(self.prefix)
        except ValueError as e:
            raise StartupError(f"bad PREFIX: {e}") from None
        if self.copy not in ("auto", "yes", "no"):
            raise StartupError(f"--copy must be auto, yes or no, not {self.copy!r}")
        if self.part_size < 5 * MIB:
            raise StartupError("--part-size must be at least 5 MiB (the S3 minimum part size)")
        if not self.provider and self.local_dir is not None:
            # --local serves our own SeaweedFS: its endpoint is not known until it starts
            # (cfg.endpoint still holds the Filebase default here), and it needs no rate limit.
            self.provider = "seaweedfs"
        self.provider = self.provider or detect_provider(self.endpoint)
        if self.provider not in PROVIDERS:
            raise StartupError(
                f"--provider must be one of {', '.join(PROVIDERS)}, not {self.provider!r}"
            )
        if self.max_rps is None:
            self.max_rps = PROVIDERS[self.provider].max_rps
        if self.bucket is None and self.prefix:
            raise StartupError("a PREFIX needs a bucket: BUCKET:PREFIX")
        if self.allow_other:
            # Other users must never bypass the modes fbmount shows.
            self.default_permissions = True

    @property
    def all_buckets(self) -> bool:
        """No bucket given: the whole account, one directory per bucket (account.py)."""
        return self.bucket is None

    @property
    def source(self) -> str:
        """BUCKET[:PREFIX] as shown in /proc/mounts ('all-buckets@HOST' for an account)."""
        if self.bucket is None:
            return f"all-buckets@{self.endpoint.split('://', 1)[-1].split('/', 1)[0]}"
        return f"{self.bucket}:{self.prefix.rstrip('/')}" if self.prefix else self.bucket

    def state_dir(self) -> Path:
        """Per endpoint+bucket+prefix directory for staging and the metadata index; an
        account mount keeps one per bucket below its own (bucket_state_dir)."""
        base = self.cache_dir or default_cache_dir()
        # --local: the server's port may change between runs; its data dir does not.
        where = f"local:{self.local_dir}" if self.local_dir is not None else self.endpoint
        ident = f"{where}|{self.bucket}|{self.prefix}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        name = "account" if self.bucket is None else _safe(self.bucket)
        suffix = f"-{self.state_instance}" if self.state_instance > 1 else ""
        return base / f"{name}-{digest}{suffix}"

    def bucket_state_dir(self, bucket: str) -> Path:
        return self.state_dir() / "buckets" / _safe(bucket)


def _safe(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "-_.")


def default_cache_dir() -> Path:
    if os.getuid() == 0 and "XDG_CACHE_HOME" not in os.environ:
        return Path("/var/cache/fbmount")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fbmount"


def parse_size_mib(text: str) -> int:
    """'8' → 8 MiB; also accepts suffixes K, M, G (binary)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = MIB
    for suffix, m in (("K", 1024), ("M", MIB), ("G", 1024 * MIB)):
        if text.endswith(suffix):
            text, mult = text[:-1], m
            break
    try:
        return int(float(text) * mult)
    except ValueError:
        raise StartupError(f"not a size: {text!r}") from None


def apply_o_options(values: dict, opts: list[str]) -> None:
    """Fold `-o a,b=c` items into the keyword dict used to build Config."""
    names = {f.name for f in fields(Config) if f.init}
    for raw in opts:
        for item in filter(None, (s.strip() for s in raw.split(","))):
            key, has_value, value = item.partition("=")
            key = key.replace("-", "_")
            if (
                item in IGNORED_MOUNT_OPTIONS
                or key.lower().startswith(("x-", "x_"))
                or key == "user"
            ):
                continue
            if key == "comment":
                continue
            if key in ("ro", "read_only"):
                values["read_only"] = True
            elif key in (
                "allow_other",
                "default_permissions",
                "debug",
                "foreground",
                "all_buckets",
            ):
                values[key] = True
            elif key in ("uid", "gid"):
                values[key] = int(value)
            elif key == "umask":
                values["umask"] = int(value, 8)
            elif key in ("part_size", "read_ahead", "memory_limit"):
                values[key] = parse_size_mib(value)
            elif key in (
                "upload_delay",
                "attr_ttl",
                "dir_ttl",
                "timeout",
                "url_expiry",
                "max_rps",
                "flush_timeout",
            ):
                values[key] = float(value)
            elif key in ("parallel", "retries"):
                values[key] = int(value)
            elif key in ("passwd_file", "ca_bundle", "cache_dir"):
                values[key] = Path(value)
            elif key in names and has_value:
                values[key] = value
            elif key in ("allow_root", "auto_unmount", "kernel_cache", "noforget"):
                values.setdefault("extra_fuse_options", []).append(item)
            else:
                raise StartupError(f"unknown mount option: -o {item}")
