#!/usr/bin/env bash
# Makes sure the `redis-server` binary is installed (tests start their own servers on free
# loopback ports; scripts/cluster.sh starts one for the local cluster). Installs Debian's
# redis-server package when it is missing; does nothing when it is there.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: redis-server is missing and this is not a Debian/Ubuntu machine; install Redis 7" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing redis-server (Debian package)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
# The package may start a system-wide server on 6379; the tests and the cluster script never
# use that port, so it is left as the package configures it.
command -v redis-server >/dev/null
