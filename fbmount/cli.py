"""Command line: `fbmount [BUCKET[:PREFIX]] MOUNTPOINT [options]` and the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fbmount import __version__
from fbmount.config import (
    DEFAULT_ENDPOINT,
    Config,
    apply_consistency,
    apply_o_options,
    parse_size_mib,
)
from fbmount.errors import StartupError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line and exit 1, like every other fbmount error."""
        raise StartupError(f"{message} (see fbmount --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fbmount",
        description="Mount a Filebase (or any S3-compatible) bucket as a directory.",
        epilog="Every long option can also be given as -o name=value (fstab, systemd).",
    )
    p.add_argument("positional", nargs="+", metavar="[BUCKET[:PREFIX]] MOUNTPOINT")
    p.add_argument(
        "--all-buckets",
        action="store_true",
        default=None,
        help="mount the whole account, one directory per bucket (the default when no "
        "BUCKET is given); mkdir/rmdir at the top create/delete buckets",
    )
    p.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="start a private S3 server (SeaweedFS) with its data in DIR and mount "
        "its bucket 'local' (needs the 'local' extra); stops with the mount",
    )
    p.add_argument("--endpoint", help=f"S3 endpoint URL (default {DEFAULT_ENDPOINT})")
    p.add_argument("--region", help="SigV4 region (default us-east-1)")
    p.add_argument("--profile", help="AWS shared-credentials profile")
    p.add_argument("--passwd-file", type=Path, help="s3fs-style ACCESS:SECRET file (mode 0600)")
    p.add_argument("--ca-bundle", type=Path, help="PEM CA bundle to verify the endpoint with")
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        default=None,
        help="stay in the foreground (default: daemonize once mounted)",
    )
    p.add_argument("--read-only", action="store_true", default=None)
    p.add_argument("--debug", action="store_true", default=None, help="log every request")
    p.add_argument("--cache-dir", type=Path, help="staging and metadata index directory")
    p.add_argument(
        "--upload-delay",
        type=float,
        metavar="SECS",
        help="upload a closed file after it has been left alone this long "
        "(default 2; 0 = upload at close)",
    )
    p.add_argument(
        "--consistency",
        choices=("default", "strict"),
        help="strict: s3fs's contract (upload at close, attributes asked at every stat)",
    )
    p.add_argument("--attr-ttl", type=float, metavar="SECS", help="attribute cache (default 10)")
    p.add_argument("--dir-ttl", type=float, metavar="SECS", help="listing cache (default 10)")
    p.add_argument("--part-size", metavar="MIB", help="multipart part size (default 8)")
    p.add_argument("--read-ahead", metavar="MIB", help="sequential read-ahead (default 64)")
    p.add_argument(
        "--memory-limit",
        metavar="MIB",
        help="read-ahead memory shared by all open files (default 128)",
    )
    p.add_argument("--parallel", type=int, help="parallel part uploads/GETs per file (default 8)")
    p.add_argument(
        "--copy",
        choices=["auto", "yes", "no"],
        help="use server-side CopyObject (default auto: probe, then remember)",
    )
    p.add_argument(
        "--provider",
        choices=["filebase", "aws", "minio", "seaweedfs", "other"],
        help="S3 service quirks (default: detected from the endpoint; seaweedfs with --local)",
    )
    p.add_argument(
        "--max-rps",
        type=float,
        metavar="N",
        help="client-side limit of S3 requests per second (filebase: 100; 0 = none)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECS",
        help="deadline of one S3 call including retries (default 120)",
    )
    p.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="attempts per S3 request, jittered exponential backoff (default 5)",
    )
    p.add_argument(
        "--flush-timeout",
        type=float,
        metavar="SECS",
        help="how long unmount/SIGTERM waits for staged uploads (default 600)",
    )
    p.add_argument(
        "--url-expiry",
        type=float,
        metavar="SECS",
        help="lifetime of user.fbmount.url links (default 3600)",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="mount options: allow_other, default_permissions, uid=, gid=, umask=, ro",
    )
    p.add_argument("--version", action="version", version=f"fbmount {__version__}")
    return p


def config_from_args(argv: list[str]) -> Config:
    args = build_parser().parse_args(argv)
    values: dict = {}
    try:
        apply_o_options(values, args.options)
    except ValueError as e:  # e.g. -o uid=abc: one line, not a traceback
        raise StartupError(f"bad -o value: {e}") from None
    for name in (
        "endpoint",
        "region",
        "profile",
        "passwd_file",
        "ca_bundle",
        "foreground",
        "read_only",
        "debug",
        "cache_dir",
        "upload_delay",
        "attr_ttl",
        "dir_ttl",
        "parallel",
        "copy",
        "url_expiry",
        "flush_timeout",
        "provider",
        "max_rps",
        "timeout",
        "retries",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    for name in ("part_size", "read_ahead", "memory_limit"):
        if getattr(args, name) is not None:
            values[name] = parse_size_mib(getattr(args, name))
    if args.consistency is not None:
        values["consistency"] = args.consistency
    apply_consistency(values)
    all_buckets = bool(args.all_buckets or values.pop("all_buckets", False))
    if args.local is not None:
        values["local_dir"] = args.local.absolute()
        values.setdefault("cache_dir", values["local_dir"] / "cache")
        if len(args.positional) == 1 and not all_buckets:
            args.positional.insert(0, "local")
    if len(args.positional) == 1:
        all_buckets = True
    elif all_buckets and len(args.positional) == 2 and args.positional[0] in FSTAB_ANY_SOURCE:
        del args.positional[0]  # fstab needs something in its first field
    elif all_buckets:
        raise StartupError("--all-buckets mounts every bucket: give only MOUNTPOINT")
    if len(args.positional) != (1 if all_buckets else 2):
        raise StartupError("usage: fbmount [BUCKET[:PREFIX]] MOUNTPOINT [options]")
    if all_buckets:
        return Config(bucket=None, mountpoint=Path(args.positional[0]).absolute(), **values)
    source, mountpoint = args.positional
    bucket, _, prefix = source.partition(":")
    if not bucket:
        raise StartupError("no bucket given: use BUCKET[:PREFIX]")
    return Config(bucket=bucket, prefix=prefix, mountpoint=Path(mountpoint).absolute(), **values)


# What an fstab line of an account mount may put in its first field.
FSTAB_ANY_SOURCE = ("none", "all-buckets", "fbmount")


SUBCOMMANDS = {"status", "sync", "umount", "unmount", "doctor", "mount"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
        if command != "mount":
            from fbmount import tools

            return tools.main(command, argv)
    try:
        cfg = config_from_args(argv)
    except StartupError as e:
        print(f"fbmount: {e}", file=sys.stderr)
        return 1
    from fbmount import daemon  # imported late: --help stays fast

    return daemon.run(cfg)
