"""Where keys come from: env vars, an s3fs-style password file, or an AWS profile.

Keys never reach a log line, an error message or the process title.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fbmount.errors import StartupError


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = ""
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key={self.access_key[:4]}…)"


def read_passwd_file(path: Path, bucket: str | None) -> Credentials:
    """Read `ACCESS:SECRET` (or s3fs's `bucket:ACCESS:SECRET` lines)."""
    try:
        st = path.stat()
    except OSError as e:
        raise StartupError(f"cannot read password file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StartupError(
            f"password file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    fallback = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) == 2:
            fallback = fallback or Credentials(parts[0], parts[1])
        elif len(parts) == 3 and parts[0] == bucket:
            return Credentials(parts[1], parts[2])
    if fallback:
        return fallback
    raise StartupError(f"password file {path} has no ACCESS:SECRET line")


def resolve(
    passwd_file: Path | None, profile: str | None, bucket: str | None
) -> Credentials | None:
    """Explicit file, then an explicit profile (botocore), env, s3fs's files; None = botocore."""
    if passwd_file:
        return read_passwd_file(passwd_file, bucket)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret and not profile:
        return Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN"))
    if not profile:
        for candidate in (Path.home() / ".passwd-fbmount", Path("/etc/passwd-fbmount")):
            if candidate.exists():
                return read_passwd_file(candidate, bucket)
    return None  # profile / shared credentials / instance metadata via botocore
