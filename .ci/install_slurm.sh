#!/usr/bin/env bash
# Installs what the Slurm tests (tests/test_slurm.py, marker `slurm`) need: Slurm 22.05 from Debian
# (slurmctld, slurmd, client commands), munge, and the tools the test cluster uses (iproute2 for the
# network namespaces and the bridge, util-linux for unshare/nsenter, procps).
# Idempotent and quiet: does nothing when everything is installed; prints apt's output only on failure.
# Starts no daemon: the pytest fixture (tests/slurm_cluster.py) runs its own private cluster.
set -euo pipefail

pkgs=(slurm-wlm munge iproute2 util-linux procps)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_slurm.sh: need root to install ${missing[*]}" >&2
        exit 1
    fi
fi

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
    [ "$made_policy" = 1 ] && $SUDO rm -f "$policy"
    rm -f "$log"
}
trap cleanup EXIT
# no service may start while installing (no systemd here; the tests start their own daemons)
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
fi
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_slurm.sh: installing ${missing[*]} failed" >&2
    exit 1
fi
