#!/usr/bin/env bash
# Installs what netagent needs on a fresh Debian/Ubuntu machine, then the project itself
# into a virtual environment. Safe to run again: it installs only what is missing.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A pkgs=(
  [ip]=iproute2 [nft]=nftables [iptables]=iptables [conntrack]=conntrack
  [ping]=iputils-ping [unshare]=util-linux [nsenter]=util-linux [make]=make
)
missing=()
for tool in "${!pkgs[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${pkgs[$tool]}")
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
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: ready ($venv)"
