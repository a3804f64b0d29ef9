"""One error type crosses every layer: an errno for the kernel and a sentence for people.

store.py turns botocore/aiohttp failures into FsError; fs.py turns FsError into
pyfuse3.FUSEError; cli.py prints the message of a StartupError and exits 1.
"""

from __future__ import annotations

import errno


class FsError(Exception):
    """A failure that a syscall reports as `errno`, with a message for the log."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err
        self.message = message or errno.errorcode.get(err, str(err))


class StartupError(Exception):
    """Something the user must fix before a mount can start (one line, no traceback)."""


class CopyNotSupported(FsError):
    """The server refused CopyObject/UploadPartCopy: callers fall back to streaming."""

    def __init__(self, message: str = "server refuses CopyObject") -> None:
        super().__init__(errno.ENOTSUP, message)


class CopyTooLarge(FsError):
    """One CopyObject takes at most 5 GiB: callers copy in parts (UploadPartCopy)."""

    def __init__(self, message: str = "copy source larger than one CopyObject takes") -> None:
        super().__init__(errno.EFBIG, message)


class PreconditionFailed(FsError):
    """The object changed under us (If-Match failed): never mix old and new bytes."""

    def __init__(self, key: str) -> None:
        super().__init__(errno.EIO, f"{key}: object changed on the server while being read")


# S3 error codes → errno. Anything not listed becomes EIO.
S3_CODE_ERRNO: dict[str, int] = {
    "NoSuchKey": errno.ENOENT,
    "404": errno.ENOENT,
    "NotFound": errno.ENOENT,
    "NoSuchBucket": errno.ENOENT,
    "NoSuchUpload": errno.EIO,
    "AccessDenied": errno.EACCES,
    "403": errno.EACCES,
    "Forbidden": errno.EACCES,
    "InvalidAccessKeyId": errno.EACCES,
    "SignatureDoesNotMatch": errno.EACCES,
    "AllAccessDisabled": errno.EACCES,
    "EntityTooLarge": errno.EFBIG,
    "KeyTooLongError": errno.ENAMETOOLONG,
    "InvalidBucketName": errno.EINVAL,
    "BucketNotEmpty": errno.ENOTEMPTY,
    "BucketAlreadyExists": errno.EEXIST,
    "BucketAlreadyOwnedByYou": errno.EEXIST,
    "NotImplemented": errno.ENOTSUP,
    "501": errno.ENOTSUP,
    "PreconditionFailed": errno.EIO,
    "412": errno.EIO,
    "InvalidRange": errno.EINVAL,
    "QuotaExceeded": errno.EDQUOT,
    # Throttling that outlasted the retries: EIO, not EAGAIN, which on a blocking syscall
    # (close, read, fsync) means nothing a caller can act on (README: strict close → EIO).
    "SlowDown": errno.EIO,
    "ServiceUnavailable": errno.EIO,
    "RequestTimeout": errno.ETIMEDOUT,
}
