"""mount.fbmount: the mount(8) helper that makes `/etc/fstab` lines of type `fbmount` work.

mount(8) runs `/sbin/mount.fbmount SPEC DIR [-sfnv] [-o OPTS]` (libmount only searches
/sbin, /sbin/fs.d and /sbin/fs, so a pip-installed helper needs a symlink there). It
passes the fstab options minus the ones it consumes itself, always adds `rw` or `ro`,
and for `user` mounts adds `noexec,nosuid,nodev`. It also strips PATH and HOME from
the helper's environment. The helper must return only once the filesystem is mounted:
`fbmount` without -f does exactly that (its parent exits 0 once the mount is live).

This module translates that calling convention into `fbmount SPEC DIR -o OPTS` and
replaces itself with fbmount (exec), so fbmount's exit status is mount(8)'s answer.
"""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from collections.abc import Iterable, Sequence

__all__ = ["build_fbmount_argv", "split_options", "parse_args", "fbmount_program", "main"]

PROG = "mount.fbmount"

# Options that only mean something to mount(8), systemd or fstab readers; fbmount needs
# none of them. rw is fbmount's default; ro is kept (it maps to --read-only).
DROP_EXACT = frozenset(
    {
        "",
        "_netdev",
        "nofail",
        "noauto",
        "auto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "defaults",
        "rw",
    }
)
# x-*/X-* are userspace comments (x-systemd.*, x-gvfs-show, X-mount.mkdir); comment= is
# the older spelling; user= and helper= are libmount bookkeeping for user mounts.
DROP_PREFIXES = ("x-", "X-", "comment=", "user=", "helper=")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

USAGE = f"usage: {PROG} BUCKET[:PREFIX]|none MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]"


class UsageError(Exception):
    """Bad invocation; reported on one line, exit status 1 like fbmount's own errors."""


def split_options(text: str) -> list[str]:
    """Split a mount option string at commas outside double quotes, as libmount does."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [opt for opt in out if opt]


def keep_option(opt: str) -> bool:
    """True for options fbmount should see; False for mount(8)/systemd-only ones."""
    return opt not in DROP_EXACT and not opt.startswith(DROP_PREFIXES)


def build_fbmount_argv(
    spec: str,
    mountpoint: str,
    options: Iterable[str],
    *,
    program: Sequence[str] = ("fbmount",),
) -> list[str]:
    """The fbmount command line for one mount(8) request (pure; no -f, so it daemonizes).

    `options` may hold single options or comma lists (as given to -o); order is kept,
    exact duplicates are dropped, and options only mount(8)/systemd care about go away.
    """
    kept: list[str] = []
    for item in options:
        for opt in split_options(item):
            if keep_option(opt) and opt not in kept:
                kept.append(opt)
    argv = [*program, spec, mountpoint]
    if kept:
        argv += ["-o", ",".join(kept)]
    return argv


class Request:
    """What mount(8) asked for."""

    def __init__(self) -> None:
        self.spec = ""
        self.mountpoint = ""
        self.options: list[str] = []
        self.fake = False
        self.verbose = False
        self.no_mtab = False
        self.sloppy = False
        self.fstype: str | None = None


def parse_args(args: Sequence[str]) -> Request:
    """Parse mount(8)'s helper convention: two positionals, then -sfnv, -o OPTS, -t TYPE.

    Flags may come before, between or after the positionals and may be combined (-fv);
    -o may repeat and be glued (-oro). -N (namespace) is refused: fbmount cannot honour it.
    """
    req = Request()
    positional: list[str] = []
    i = 0
    only_positional = False
    while i < len(args):
        arg = args[i]
        i += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if arg == "--":
            only_positional = True
            continue
        if arg in ("-h", "--help"):
            raise UsageError(USAGE)
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg}\n{USAGE}")
        j = 1
        while j < len(arg):
            flag = arg[j]
            j += 1
            if flag in "otN":
                value = arg[j:]
                if not value:
                    if i >= len(args):
                        raise UsageError(f"option -{flag} needs an argument\n{USAGE}")
                    value = args[i]
                    i += 1
                if flag == "o":
                    req.options.append(value)
                elif flag == "t":
                    req.fstype = value
                else:
                    raise UsageError("-N (mount namespace) is not supported")
                break
            if flag == "f":
                req.fake = True
            elif flag == "v":
                req.verbose = True
            elif flag == "n":
                req.no_mtab = True
            elif flag == "s":
                req.sloppy = True
            else:
                raise UsageError(f"unknown option -{flag}\n{USAGE}")
    if len(positional) != 2:
        raise UsageError(USAGE)
    req.spec, req.mountpoint = positional
    if not req.spec or not req.mountpoint:
        raise UsageError(USAGE)
    return req


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def fbmount_program() -> list[str]:
    """How to run fbmount from the same installation as this helper.

    The console script beside this one (argv[0] may be the /sbin symlink, so resolve it)
    or beside the interpreter (a venv's bin/), else `python -m fbmount` with this very
    interpreter. $PATH is deliberately not searched: mount(8) gives the helper none, and
    a PATH hit could be another installation of a different version.
    """
    candidates = []
    if sys.argv and sys.argv[0]:
        candidates.append(os.path.dirname(os.path.realpath(sys.argv[0])))
    if sys.executable:
        candidates.append(os.path.dirname(sys.executable))
    for directory in candidates:
        path = os.path.join(directory, "fbmount")
        if _executable(path):
            return [path]
    return [sys.executable or "python3", "-m", "fbmount"]


def helper_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """mount(8) strips PATH and HOME; restore sane values for fbmount and what it runs.

    PATH: the interpreter's bin directory first (a venv), then the usual system
    directories (fusermount3), then whatever was there. HOME: the user's home, which
    the AWS profile chain and the default cache directory depend on.
    """
    env = dict(os.environ if environ is None else environ)
    parts: list[str] = []
    if sys.executable:
        parts.append(os.path.dirname(sys.executable))
    parts += DEFAULT_PATH.split(":")
    parts += [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(dict.fromkeys(parts))  # de-duplicated, order kept
    if not env.get("HOME"):
        try:
            env["HOME"] = pwd.getpwuid(os.getuid()).pw_dir or "/"
        except KeyError:
            env["HOME"] = "/"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mount.fbmount` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        req = parse_args(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    mountpoint = os.path.abspath(req.mountpoint)
    command = build_fbmount_argv(req.spec, mountpoint, req.options, program=fbmount_program())
    if req.verbose:
        print(f"{PROG}: {shlex.join(command)}", file=sys.stderr)
    if req.fake:
        return 0
    env = helper_environment()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(command[0], command, env)
    except OSError as exc:
        print(f"{PROG}: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 1
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
