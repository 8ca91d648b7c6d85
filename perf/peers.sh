#!/usr/bin/env bash
# Pod -> pod through stromd, side by side in one run with the reference peers of
# ../shared/bench/peers.sh (Linux forwarding, Linux + nftables DNAT, DPDK testpmd over AF_XDP).
# Usage (root): perf/peers.sh [-s seconds] [-r rounds]     Results: /tmp/pb-results.txt
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS_SH:-$here/../shared/bench/peers.sh}
[ -x "$peers" ] || [ -f "$peers" ] || { echo "peers.sh not found at $peers (set PEERS_SH)" >&2; exit 1; }
missing=()
for p in dpdk-dev librte-net-af-xdp23 netsniff-ng sockperf iperf3 nftables ethtool; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$here/target/release/stromd" ] || (cd "$here" && cargo build --release --workspace --locked)
DUT_CMD="$here/perf/dut-stromd.sh" exec bash "$peers" "$@" kernel kernel-nat testpmd
