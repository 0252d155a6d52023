#!/usr/bin/env bash
# Installs what netagent needs on a fresh Debian/Ubuntu machine, then the project itself
# into a virtual environment. Safe to run again: it installs only what is missing.
#
#   scripts/setup.sh VENV          what the daemon, the CLI and the demo need
#   scripts/setup.sh VENV --test   and what the tests and the benchmark need besides:
#                                  the container runtimes, CNI plugins and etcd they
#                                  drive (each test gives them private state dirs)
set -euo pipefail
venv="${1:-.venv}"
mode="${2:-}"
cd "$(dirname "$0")/.."

# command (or file) -> Debian package
declare -A pkgs=(
  [ip]=iproute2 [nft]=nftables [iptables]=iptables [conntrack]=conntrack
  [ping]=iputils-ping [unshare]=util-linux [nsenter]=util-linux [make]=make
  [dot]=graphviz
)
if [ "$mode" = "--test" ]; then
  pkgs+=(
    [podman]=podman [conmon]=conmon [crun]=crun [containerd]=containerd
    [ctr]=containerd [dockerd]=docker.io [busybox]=busybox-static
    [/usr/lib/cni/bridge]=containernetworking-plugins [/usr/lib/podman/netavark]=netavark
    [etcd]=etcd-server [etcdctl]=etcd-client [openssl]=openssl
    [systemd-analyze]=systemd [systemd-socket-activate]=systemd [setpriv]=util-linux
  )
fi
missing=()
for tool in "${!pkgs[@]}"; do
  if [[ "$tool" == /* ]]; then
    [ -e "$tool" ] || missing+=("${pkgs[$tool]}")
  else
    command -v "$tool" >/dev/null 2>&1 || missing+=("${pkgs[$tool]}")
  fi
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no recommends, and no service is started here (the tests start what they need,
  # in sandboxes); policy-rc.d keeps Debian's maintainer scripts from starting any
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.netagent
  chmod +x /usr/sbin/policy-rc.d.netagent
  [ -e /usr/sbin/policy-rc.d ] || ln -s policy-rc.d.netagent /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
  if [ "$(readlink /usr/sbin/policy-rc.d 2>/dev/null)" = "policy-rc.d.netagent" ]; then
    rm -f /usr/sbin/policy-rc.d
  fi
  rm -f /usr/sbin/policy-rc.d.netagent
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# editable as a path (compat): setuptools' default editable finder is imported by every
# interpreter the venv starts, ~13 ms of each CLI command (docs/cli.md)
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  --config-settings editable_mode=compat -e '.[test]'
# the console script pip wrote, without its `import re` (~7 ms of every command here: re
# pulls in enum; its argv[0] rewrite is for Windows' .exe launchers). Same interpreter
shebang=$(head -n 1 "$venv/bin/netagent")
printf '%s\n' "$shebang" 'import sys' 'from netagent.cli.entry import main' \
  'if __name__ == "__main__":' '    sys.exit(main())' > "$venv/bin/netagent.new"
chmod 755 "$venv/bin/netagent.new"
mv "$venv/bin/netagent.new" "$venv/bin/netagent"
echo "setup: ready ($venv${mode:+, $mode})"
