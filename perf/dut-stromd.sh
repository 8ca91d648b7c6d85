#!/usr/bin/env bash
# stromd as the device under test of ../shared/bench/peers.sh (run there as DUT_CMD, inside the
# node namespace, with IPA IPB GWA GWB MAC_A MAC_B exported). Registers the two pod ports ha/hb
# and stays in the foreground until peers.sh stops the process group (SIGINT: clean shutdown).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${STROM_BIN:-$here/target/release}
run=$(mktemp -d /tmp/strom-dut.XXXXXX)
cat >"$run/stromd.toml" <<CFG
[node]
# the gateways GWA/GWB are the node's, but the pods reach them only by static neighbour entries
addresses = []
pod_cidr = "198.18.0.0/22"
pod_gateway = "169.254.1.1"
[dataplane]
workers = ${STROM_WORKERS:-1}
cores = [${STROM_CORES:-1}]
poll_mode = "${STROM_POLL:-busy}"
${STROM_RING:+ring_size = $STROM_RING}
${STROM_FRAMES:+umem_frames = $STROM_FRAMES}
${STROM_FILL:+fill_per_port = $STROM_FILL}
api_socket = "$run/stromd.sock"
state_dir = "$run"
CFG
"$bin/stromd" --config "$run/stromd.toml" --log warn &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid; rm -rf "$run"' EXIT INT TERM
for _ in $(seq 100); do [ -S "$run/stromd.sock" ] && break; sleep 0.05; done
"$bin/stromctl" -s "$run/stromd.sock" add-port --ifname ha --ip "$IPA" --mac "$MAC_A" --container-id pod-a >/dev/null
"$bin/stromctl" -s "$run/stromd.sock" add-port --ifname hb --ip "$IPB" --mac "$MAC_B" --container-id pod-b >/dev/null
wait $pid
