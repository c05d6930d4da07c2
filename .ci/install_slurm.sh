#!/usr/bin/env bash
# Installs what the Slurm tests (tests/test_slurm.py, marker `slurm`) need: Slurm 22.05 from
# Debian (controller, node daemon, client commands), munge, and the network tools the test
# cluster uses (iproute2 for network namespaces and a bridge, util-linux for unshare/nsenter).
# Idempotent and quiet; needs root. The daemons are NOT started here: the pytest fixture in
# tests/slurm_cluster.py starts its own private cluster under a temporary folder.
set -euo pipefail

pkgs=(slurm-wlm munge iproute2 util-linux procps)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: need root to install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Install without starting services (no systemd here; the fixture runs its own daemons).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
