"""systemd and mount(8) integration: the unit file, sd_notify, and the mount.fbmount helper.

The unit is checked with the real `systemd-analyze verify` (offline, against a throw-away
root so that it does not depend on where fbmount is installed). sd_notify is checked
against a real datagram socket. The mount tests run the real fbmount against a private
SeaweedFS and a real FUSE mount, including through mount(8) itself in a private mount
namespace (libmount only looks for helpers in /sbin; the namespace lets the test put one
there without touching the host).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fbmount import notify
from fbmount.mount_helper import build_fbmount_argv, parse_args, split_options

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "fbmount@.service"
EXAMPLE_CONF = REPO / "systemd" / "example.conf"
SYSTEM_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)


# --------------------------------------------------------------------------- unit file


def _analyze_root(tmp_path: Path, unit_text: str) -> Path:
    """A minimal root for `systemd-analyze --root`: the distro's units, our unit, and
    stand-ins for the programs the unit runs (verify checks they exist and are executable)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/fbmount@.service").write_text(unit_text)
    (root / "etc/fbmount").mkdir(parents=True)
    shutil.copy(EXAMPLE_CONF, root / "etc/fbmount/test.conf")
    for prog in ("usr/local/bin/fbmount", "usr/bin/fusermount3", "usr/bin/mkdir"):
        path = root / prog
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return root


def _verify(tmp_path: Path, unit_text: str) -> tuple[int, list[str]]:
    """Run systemd-analyze verify on the instance fbmount@test; return rc and the
    complaints about our unit (verify exits 0 on unknown keys and bad values, so the
    messages are what count)."""
    if shutil.which("systemd-analyze") is None or SYSTEM_UNITS is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install -y systemd)")
    root = _analyze_root(tmp_path, unit_text)
    proc = subprocess.run(
        ["systemd-analyze", f"--root={root}", "--man=no", "verify", "fbmount@test.service"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in output if "fbmount" in line]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    rc, complaints = _verify(tmp_path, UNIT.read_text())
    assert rc == 0, complaints
    assert complaints == []


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """Negative control: the check above really sees bad keys and values."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=bogus")
    broken = broken.replace("TimeoutStopSec=", "TimeoutStopSecs=")
    rc, complaints = _verify(tmp_path, broken)
    text = "\n".join(complaints)
    assert "bogus" in text and "TimeoutStopSecs" in text, (rc, complaints)


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# Each of these gives the service its own mount namespace, and a FUSE mount made inside it
# is not seen by the rest of the system; some also hide /dev/fuse.
NAMESPACE_SETTINGS = {
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateUsers",
    "PrivateNetwork",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectHostname",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountAPIVFS",
    "MountFlags",
    "DynamicUser",
}


def test_unit_keeps_the_mount_visible_and_notifies() -> None:
    settings = _unit_settings()
    assert not NAMESPACE_SETTINGS & settings.keys()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["KillMode"] == ["mixed"]
    assert int(settings["TimeoutStopSec"][0]) >= 300
    assert settings["Restart"] == ["on-failure"]
    assert settings["EnvironmentFile"] == ["/etc/fbmount/%i.conf"]
    assert "/dev/fuse rw" in settings["DeviceAllow"]
    assert "CAP_SYS_ADMIN" in settings["CapabilityBoundingSet"][0].split()
    (start,) = settings["ExecStart"]
    argv = start.split()
    assert argv[:4] == ["fbmount", "${FBMOUNT_BUCKET}", "${FBMOUNT_MOUNTPOINT}", "-f"]
    assert argv[-1] == "$FBMOUNT_OPTIONS"  # unbraced: split into words by systemd
    assert any("fusermount3 -uz ${FBMOUNT_MOUNTPOINT}" in v for v in settings["ExecStopPost"])
    assert "network-online.target" in settings["Wants"][0]
    assert "network-online.target" in settings["After"][0]


def test_example_conf_is_an_environment_file() -> None:
    values = {}
    for raw in EXAMPLE_CONF.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
            values[key] = value.strip('"')
    assert {"FBMOUNT_BUCKET", "FBMOUNT_MOUNTPOINT", "FBMOUNT_OPTIONS"} <= values.keys()
    assert "--passwd-file" in values["FBMOUNT_OPTIONS"].split()


# --------------------------------------------------------------------------- sd_notify


@contextlib.contextmanager
def notify_listener(address: str) -> Iterator[socket.socket]:
    """A datagram socket like systemd's, bound at `address` ('@name' = abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bind_to: str | bytes = "\0" + address[1:] if address.startswith("@") else address
    sock.bind(bind_to)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def _short_socket_path() -> str:
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    return f"/tmp/fbmount-notify-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


def test_notify_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready("x") is False
    assert notify.stopping() is False
    assert notify.status("x") is False
    assert notify.extend_timeout(1) is False


def test_notify_to_path_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _short_socket_path()
    try:
        with notify_listener(path) as sock:
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            assert notify.ready("mounted s3://b on /mnt/x") is True
            msg = sock.recv(4096).decode()
            assert msg.splitlines() == ["READY=1", "STATUS=mounted s3://b on /mnt/x"]
            assert notify.ready() is True
            assert sock.recv(4096) == b"READY=1"
            assert notify.status("two\nlines") is True
            assert sock.recv(4096) == b"STATUS=two lines"  # a newline would start a new key
            assert notify.stopping("flushing 3 files") is True
            assert sock.recv(4096).decode().splitlines() == [
                "STOPPING=1",
                "STATUS=flushing 3 files",
            ]
            assert notify.extend_timeout(30_000_000) is True
            assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=30000000"
            assert notify.ready(mainpid=1234) is True
            assert sock.recv(4096) == b"READY=1\nMAINPID=1234"
            # The variable stays set: later notifications (STOPPING=1) still work.
            assert os.environ["NOTIFY_SOCKET"] == path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_notify_to_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@fbmount-test/{os.getpid()}/{uuid.uuid4().hex}"
    with notify_listener(name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert notify.notify("READY=1\nSTATUS=ok") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd gone, or an address form we do not speak: False, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", _short_socket_path())  # nobody listening
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify.ready() is False


# --------------------------------------------------------------------------- mount.fbmount


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # A typical fstab line, as mount(8) hands it over (it adds rw, keeps _netdev/nofail).
        (
            [
                "rw,_netdev,allow_other,endpoint=https://s3.filebase.com,"
                "passwd_file=/etc/fbmount/x.passwd,nofail"
            ],
            [
                "-o",
                "allow_other,endpoint=https://s3.filebase.com,passwd_file=/etc/fbmount/x.passwd",
            ],
        ),
        # Everything only mount(8)/systemd/fstab readers care about disappears.
        (
            [
                "defaults,auto,noauto,user,users,nouser,owner,group,x-systemd.automount,"
                "x-systemd.requires=a.service,X-mount.mkdir,x-gvfs-show,comment=systemd.x,"
                "user=alice,helper=fbmount,rw"
            ],
            [],
        ),
        # ro stays (fbmount --read-only); kernel mount flags from a `user` mount stay.
        (["ro,noexec,nosuid,nodev,uid=1000,gid=1000,umask=022"], None),
        # Several -o, duplicates, single options: order kept, duplicates dropped.
        (["allow_other", "upload_delay=0", "allow_other,cache_dir=/var/cache/x"], None),
        # Commas inside double quotes belong to the value (libmount's rule).
        (['fsname="a,b",allow_other'], ["-o", 'fsname="a,b",allow_other']),
        ([], []),
    ],
)
def test_build_fbmount_argv(options: list[str], expected: list[str] | None) -> None:
    argv = build_fbmount_argv("bucket:some/prefix", "/mnt/x", options)
    assert argv[:3] == ["fbmount", "bucket:some/prefix", "/mnt/x"]
    assert "-f" not in argv  # mount(8) needs the helper to return: fbmount must daemonize
    if expected is None:
        items = [o for item in options for o in item.split(",")]
        expected = ["-o", ",".join(dict.fromkeys(items))]
    assert argv[3:] == expected


def test_build_fbmount_argv_program() -> None:
    argv = build_fbmount_argv("b", "/m", ["ro"], program=["/usr/bin/python3", "-m", "fbmount"])
    assert argv == ["/usr/bin/python3", "-m", "fbmount", "b", "/m", "-o", "ro"]


def test_split_options() -> None:
    assert split_options("a,b=1,,c") == ["a", "b=1", "c"]
    assert split_options('x="1,2",y') == ['x="1,2"', "y"]
    assert split_options("") == []


def test_parse_args_mount_conventions() -> None:
    req = parse_args(["b:p", "/mnt/x", "-sfnv", "-o", "rw,allow_other", "-oro", "-t", "fbmount"])
    assert (req.spec, req.mountpoint) == ("b:p", "/mnt/x")
    assert req.sloppy and req.fake and req.no_mtab and req.verbose
    assert req.options == ["rw,allow_other", "ro"]
    assert req.fstype == "fbmount"
    # Options first, as some callers do; -- ends options.
    req = parse_args(["-v", "-o", "ro", "--", "b", "/m"])
    assert (req.spec, req.mountpoint, req.options, req.fake) == ("b", "/m", ["ro"], False)


@pytest.mark.parametrize(
    "args",
    [[], ["b"], ["b", "/m", "x"], ["b", "/m", "-o"], ["b", "/m", "-q"], ["b", "/m", "-N", "1"]],
)
def test_parse_args_rejects(args: list[str]) -> None:
    from fbmount.mount_helper import UsageError

    with pytest.raises(UsageError):
        parse_args(args)


def _mount_env() -> dict[str, str]:
    """The environment mount(8) gives a helper: ours minus PATH and HOME (measured with
    util-linux 2.38), plus PYTHONPATH so that the package under test is importable, and
    no AWS credentials or config of the host, so that passwd_file= is what authenticates."""
    drop = {"PATH", "HOME", "NOTIFY_SOCKET", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"}
    drop |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        AWS_CONFIG_FILE="/nonexistent/fbmount-tests/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/fbmount-tests/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_helper_fake_mount_runs_nothing(tmp_path: Path) -> None:
    """mount -f calls the helper with -f: print (with -v) what would run, mount nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fbmount.mount_helper", "bkt:pre", str(mnt), "-fnv"]
        + ["-o", "rw,_netdev,allow_other,endpoint=http://127.0.0.1:1,x-systemd.automount"],
        capture_output=True,
        text=True,
        env=_mount_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not os.path.ismount(mnt)
    (line,) = proc.stderr.splitlines()
    assert line.startswith("mount.fbmount: ")
    assert f"bkt:pre {mnt} -o allow_other,endpoint=http://127.0.0.1:1" in line
    assert "_netdev" not in line and "x-systemd" not in line and " -f" not in line


def test_helper_usage_error_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fbmount.mount_helper", "only-one-arg"],
        capture_output=True,
        text=True,
        env=_mount_env(),
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("mount.fbmount: usage:")


def test_helper_environment_restores_path_and_home() -> None:
    from fbmount.mount_helper import helper_environment

    env = helper_environment({"LANG": "C.UTF-8"})
    path = env["PATH"].split(":")
    assert path[0] == os.path.dirname(sys.executable)
    assert {"/usr/bin", "/bin", "/usr/sbin", "/sbin"} <= set(path)
    assert env["HOME"] and os.path.isdir(env["HOME"])
    assert env["LANG"] == "C.UTF-8"
    # An existing PATH is kept (after the sane part), without duplicates.
    env = helper_environment({"PATH": "/opt/x/bin:/usr/bin", "HOME": "/h"})
    assert env["PATH"].split(":")[-1] == "/opt/x/bin"
    assert env["PATH"].split(":").count("/usr/bin") == 1
    assert env["HOME"] == "/h"


# --------------------------------------------------------------------------- real mounts

CORE_MISSING = importlib.util.find_spec("fbmount.cli") is None
FUSE_MISSING = not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None
needs_mount = pytest.mark.skipif(
    CORE_MISSING or FUSE_MISSING,
    reason="fbmount.cli not present yet" if CORE_MISSING else "no /dev/fuse or fusermount3",
)
DAEMON_EXIT_TIMEOUT = 120.0  # flush + exit after an unmount; generous for a loaded CI box


def _seed(s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="seed.txt", Body=b"seed\n")


def _passwd_file(tmp_path: Path, server) -> Path:
    """An s3fs-style ACCESS:SECRET file, mode 0600 as fbmount demands."""
    path = tmp_path / "passwd"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{server.access_key}:{server.secret_key}\n")
    path.chmod(0o600)
    return path


def _mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: never touches the FUSE filesystem, so cannot hang."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mnt == real:
                return True
    return False


def _pids_with(needle: str) -> list[int]:
    """PIDs whose command line has the argument `needle` (a unique temp mountpoint, so only
    daemons this test started can match)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle.encode() in cmdline and not _zombie(int(entry)):
            pids.append(int(entry))
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for `pids` to exit; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return alive


def _cleanup(mnt: Path, pids: list[int]) -> None:
    """fusermount3 -u, then -uz; then SIGKILL (by PID) whatever this test started and left."""
    for flag in ("-u", "-uz"):
        if _mounted(mnt):
            subprocess.run(["fusermount3", flag, str(mnt)], capture_output=True, timeout=60)
    for pid in _wait_gone(pids, 30):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@needs_mount
def test_ready_only_once_mounted(tmp_path: Path, s3_server, s3, bucket: str) -> None:
    """As under Type=notify: READY=1 arrives when the mount is already live and answers;
    SIGTERM (systemctl stop) flushes, unmounts and exits 0, and STOPPING=1 is reported."""
    _seed(s3, bucket)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = _short_socket_path()
    env = _mount_env()
    env["NOTIFY_SOCKET"] = sock_path
    cmd = [sys.executable, "-m", "fbmount", bucket, str(mnt), "-f"]
    cmd += [
        "--endpoint",
        s3_server.endpoint,
        "--passwd-file",
        str(_passwd_file(tmp_path, s3_server)),
    ]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--upload-delay", "0"]
    log_path = tmp_path / "fbmount.log"
    proc = None
    try:
        with notify_listener(sock_path) as sock, log_path.open("wb") as log:
            sock.settimeout(0.5)
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
            messages: list[str] = []
            mounted_at_ready = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    msg = sock.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in msg.splitlines():
                    mounted_at_ready = _mounted(mnt)  # checked first, before anything else
                    messages.append(msg)
                    break
                messages.append(msg)
            assert mounted_at_ready is True, (messages, log_path.read_text())
            assert "seed.txt" in os.listdir(mnt)
            (mnt / "written.txt").write_bytes(b"via systemd\n")

            proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does (KillMode=mixed)
            assert proc.wait(timeout=DAEMON_EXIT_TIMEOUT) == 0, log_path.read_text()
            assert not _mounted(mnt)
            with contextlib.suppress(TimeoutError):
                while True:
                    messages.append(sock.recv(4096).decode())
            assert any("STOPPING=1" in m.splitlines() for m in messages), messages
        body = s3.get_object(Bucket=bucket, Key="written.txt")["Body"].read()
        assert body == b"via systemd\n"  # flushed before exit
    finally:
        if proc is not None and proc.poll() is None:
            _cleanup(mnt, [proc.pid])
            proc.wait(timeout=30)
        _cleanup(mnt, [])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)


@needs_mount
def test_mount_helper_mounts_and_umount_unmounts(
    tmp_path: Path, s3_server, s3, bucket: str
) -> None:
    """`mount.fbmount SPEC DIR -o fstab-options` in mount(8)'s environment (no PATH, no
    HOME) returns once the mount is live; umount(8) ends it, after the data is stored."""
    _seed(s3, bucket)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = [
        "rw",
        "_netdev",
        "nofail",
        "x-systemd.automount",
        f"endpoint={s3_server.endpoint}",
        f"passwd_file={_passwd_file(tmp_path, s3_server)}",
        f"cache_dir={tmp_path / 'cache'}",
        "upload_delay=0",
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fbmount.mount_helper", bucket, str(mnt), "-v"]
            + ["-o", ",".join(opts)],
            capture_output=True,
            text=True,
            env=_mount_env(),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert _mounted(mnt)  # live when the helper returns, as mount(8) expects
        assert "seed.txt" in os.listdir(mnt)
        (mnt / "fstab.txt").write_bytes(b"via mount.fbmount\n")
        daemons = _pids_with(str(mnt))
        assert daemons, "no daemon behind the mount"

        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        assert not _mounted(mnt)
        assert _wait_gone(daemons, DAEMON_EXIT_TIMEOUT) == [], "daemon did not exit after umount"
        body = s3.get_object(Bucket=bucket, Key="fstab.txt")["Body"].read()
        assert body == b"via mount.fbmount\n"
    finally:
        _cleanup(mnt, _pids_with(str(mnt)))


def _wrapper(path: Path, module: str) -> None:
    """An installed-looking entry point that runs the code under test."""
    path.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO}\nexport PYTHONPATH\nexec {sys.executable} -m {module} "$@"\n'
    )
    path.chmod(0o755)


@needs_mount
@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
@pytest.mark.parametrize("fstype", ["fbmount", "fuse.fbmount"])
def test_mount_command_with_fstab_options(
    tmp_path: Path, s3_server, s3, bucket: str, fstype: str
) -> None:
    """`mount -t fbmount` / `mount -t fuse.fbmount`, as an fstab line runs them.

    In a private mount namespace /usr/sbin (where libmount looks for mount.TYPE helpers)
    holds our mount.fbmount, or for fuse.fbmount a copy of fuse3's mount.fuse, which runs
    `fbmount` through /bin/sh without PATH: dash's default, /usr/local/sbin first, where
    the namespace has our fbmount. Nothing on the host is touched."""
    _seed(s3, bucket)
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    local_sbin = tmp_path / "local-sbin"
    local_sbin.mkdir()
    _wrapper(sbin / "mount.fbmount", "fbmount.mount_helper")
    _wrapper(local_sbin / "fbmount", "fbmount")
    if fstype.startswith("fuse."):
        mount_fuse = shutil.which("mount.fuse3", path="/usr/sbin:/sbin")
        if mount_fuse is None:
            pytest.skip("mount.fuse3 (Debian package fuse3) not installed")
        shutil.copy(mount_fuse, sbin / "mount.fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = ",".join(
        [
            "_netdev",
            "nofail",
            "x-systemd.automount",
            "comment=fbmount",
            f"endpoint={s3_server.endpoint}",
            f"passwd_file={_passwd_file(tmp_path, s3_server)}",
            f"cache_dir={tmp_path / 'cache'}",
            "upload_delay=0",
        ]
    )
    script = f"""
set -e
mount --bind {sbin} /usr/sbin
mount --bind {local_sbin} /usr/local/sbin
mount -t {fstype} -o {opts} {bucket} {mnt}
mountpoint -q {mnt}
ls {mnt}
printf 'via mount -t {fstype}\\n' > {mnt}/fstab.txt
cat {mnt}/fstab.txt
umount {mnt}
! mountpoint -q {mnt}
"""
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            env=_mount_env() | {"PATH": "/usr/bin:/bin"},
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "seed.txt" in proc.stdout.split(), proc.stdout
        assert f"via mount -t {fstype}" in proc.stdout
        assert _wait_gone(_pids_with(str(mnt)), DAEMON_EXIT_TIMEOUT) == [], "daemon still running"
        body = s3.get_object(Bucket=bucket, Key="fstab.txt")["Body"].read()
        assert body == f"via mount -t {fstype}\n".encode()
    finally:
        # The namespace, and any mount left in it, lives as long as the daemon does.
        for pid in _wait_gone(_pids_with(str(mnt)), 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------- the unit's own command lines, for real


def _read_environment_file(path: Path) -> dict[str, str]:
    """EnvironmentFile= semantics for the simple lines our sample uses."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _expand_exec(line: str, env: dict[str, str], specifiers: dict[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it: specifiers, then `${VAR}` (one argument) and a
    lone `$VAR` word (split at whitespace); a leading '-' (ignore failure) is dropped."""
    line = line.lstrip("-")
    line = re.sub(r"%.", lambda m: specifiers[m.group(0)], line)
    argv: list[str] = []
    for word in shlex.split(line):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            argv += env.get(lone.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def _bounding_set_for_setpriv(settings: dict[str, list[str]]) -> str:
    caps = settings["CapabilityBoundingSet"][0].split()
    return ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])


@needs_mount
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_unit_command_lines_work_with_its_capabilities(
    tmp_path: Path, s3_server, s3, bucket: str
) -> None:
    """Run the unit's ExecStartPre/ExecStart/ExecStopPost the way systemd would (the
    EnvironmentFile, specifiers, word splitting), under the unit's CapabilityBoundingSet and
    NoNewPrivileges (applied with setpriv), with a notify socket: READY=1 comes once
    mounted; common file operations work; SIGTERM flushes and exits 0; after a crash,
    ExecStopPost detaches the dead mount so that a restart mounts again."""
    settings = _unit_settings()
    _seed(s3, bucket)
    mnt = tmp_path / "mnt" / "photos"  # does not exist yet: ExecStartPre creates it
    conf = tmp_path / "test.conf"
    conf.write_text(
        f"FBMOUNT_BUCKET={bucket}\n"
        f"FBMOUNT_MOUNTPOINT={mnt}\n"
        f'FBMOUNT_OPTIONS="--endpoint {s3_server.endpoint} '
        f'--passwd-file {_passwd_file(tmp_path, s3_server)} --upload-delay 0"\n'
    )
    unit_env = _read_environment_file(conf)
    cache_root = tmp_path / "var-cache"
    (cache_root / "fbmount" / "test").mkdir(parents=True, mode=0o700)  # CacheDirectory=
    spec = {"%i": "test", "%C": str(cache_root), "%%": "%"}
    sandbox = ["setpriv", "--bounding-set", _bounding_set_for_setpriv(settings)]
    if settings.get("NoNewPrivileges") == ["yes"]:
        sandbox.append("--no-new-privs")
    sandbox.append("--")
    env = _mount_env() | unit_env

    def command(key: str) -> list[str]:
        (line,) = settings[key]
        argv = _expand_exec(line, unit_env, spec)
        if argv[0] == "fbmount":  # not installed here: the same code, from this checkout
            argv[:1] = [sys.executable, "-m", "fbmount"]
        return sandbox + argv

    start = command("ExecStart")
    assert f"--cache-dir {cache_root}/fbmount/test --endpoint" in " ".join(start)
    subprocess.run(command("ExecStartPre"), env=env, check=True, timeout=30)
    assert mnt.is_dir()

    def start_and_wait_ready(sock: socket.socket, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                start, env=env | {"NOTIFY_SOCKET": sock_path}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                msg = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.splitlines():
                assert _mounted(mnt), "READY=1 before the mount was live"
                return proc
        pytest.fail(f"no READY=1 (exit status {proc.poll()}):\n{log.read_text()}")

    sock_path = _short_socket_path()
    log = tmp_path / "fbmount.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with notify_listener(sock_path) as sock:
            sock.settimeout(0.5)
            proc = start_and_wait_ready(sock, log)
            procs.append(proc)
            (mnt / "a.txt").write_bytes(b"alpha\n")
            os.chmod(mnt / "a.txt", 0o640)
            os.chown(mnt / "a.txt", 1000, 1000)
            os.utime(mnt / "a.txt", (1_600_000_000, 1_600_000_000))
            (mnt / "dir").mkdir()
            os.rename(mnt / "a.txt", mnt / "dir" / "b.txt")
            with open(mnt / "dir" / "b.txt", "ab") as f:
                f.write(b"beta\n")
            (mnt / "gone.txt").write_bytes(b"x")
            (mnt / "gone.txt").unlink()
            st = os.stat(mnt / "dir" / "b.txt")
            assert (st.st_mode & 0o777, st.st_uid, st.st_size) == (0o640, 1000, 11)
            proc.send_signal(signal.SIGTERM)  # systemctl stop, KillMode=mixed
            assert proc.wait(timeout=DAEMON_EXIT_TIMEOUT) == 0, log.read_text()
            assert not _mounted(mnt)
            body = s3.get_object(Bucket=bucket, Key="dir/b.txt")["Body"].read()
            assert body == b"alpha\nbeta\n"
            # ExecStopPost after a clean stop: nothing to do, and its failure is ignored ('-').
            assert settings["ExecStopPost"][0].startswith("-")
            subprocess.run(command("ExecStopPost"), env=env, capture_output=True, timeout=30)

            # A crash leaves a dead mount; ExecStopPost clears it and the restart mounts.
            proc = start_and_wait_ready(sock, log)
            procs.append(proc)
            proc.kill()
            proc.wait(timeout=30)
            assert _mounted(mnt)  # dead: "Transport endpoint is not connected"
            subprocess.run(command("ExecStopPost"), env=env, capture_output=True, timeout=30)
            assert not _mounted(mnt)
            proc = start_and_wait_ready(sock, log)
            procs.append(proc)
            assert sorted(os.listdir(mnt)) == ["dir", "seed.txt"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=DAEMON_EXIT_TIMEOUT) == 0, log.read_text()
    finally:
        _cleanup(mnt, [p.pid for p in procs if p.poll() is None])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
