#!/usr/bin/env bash
# Worker efficiency of stromd on this machine:
#  1. idle CPU of each poll mode: one worker with 10 registered, silent pod ports, 10 s; and
#     of the adaptive mode with 100 (its cost grows with the ports it polls when it wakes);
#  2. forwarding with one worker core: strom-pktgen (core 0) floods pod A -> stromd (one worker,
#     busy, core 1) -> pod B (nftables drops), 60-byte UDP over 256 flows; delivered Mpps and
#     frames per worker loop;
#  3. where the worker's time goes: `perf record` on the worker's core during (2), if perf is
#     installed (linux-perf).
# Topology: ns swe-n (stromd) with veths to swe-a, swe-b and 98 idle pods swe-p1..98 (the
# first 8 registered for the 10-port runs); 198.18.16.0/24.
# Usage (root): perf/worker-efficiency.sh [-s seconds]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${STROM_BIN:-$here/target/release}
SECS=5
while getopts "s:" o; do case $o in s) SECS=$OPTARG;; *) exit 2;; esac; done
[ -x "$bin/strom-pktgen" ] || (cd "$here" && cargo build --release --locked)
N=swe-n; run=$(mktemp -d /tmp/swe.XXXXXX); pid=
nss() { ip netns list | awk '{print $1}' | grep '^swe-' || true; }
cleanup() {
  [ -n "$pid" ] && { kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
  for ns in $(nss); do ip netns del "$ns"; done
  rm -rf "$run"
}
trap cleanup EXIT
for ns in $(nss); do ip netns del "$ns"; done
ip netns add $N; ip -n $N link set lo up
pod() { # name ip: a pod namespace wired to host side h<name>
  ip netns add "swe-$1"; ip -n "swe-$1" link set lo up
  ip link add "h$1" netns $N type veth peer name eth0 netns "swe-$1"
  ip -n $N link set "h$1" up; ip -n "swe-$1" link set eth0 up
  ip -n "swe-$1" addr add "$2/32" dev eth0
  ip netns exec "swe-$1" ethtool -K eth0 tx off tso off gso off >/dev/null
  ip -n "swe-$1" route add 169.254.1.1 dev eth0 scope link
  ip -n "swe-$1" route add default via 169.254.1.1 dev eth0
}
pod a 198.18.16.2; pod b 198.18.16.3
for i in $(seq 98); do pod "p$i" "198.18.16.$((10 + i))"; done
ip netns exec swe-b nft -f - <<NFT
table inet sink {
  chain pre { type filter hook prerouting priority -300; udp dport 9 drop; }
}
NFT
mac() { ip netns exec "$1" cat "/sys/class/net/$2/address"; }
start() { # poll mode [ports, default 10]
  cat >"$run/stromd.toml" <<CFG
[node]
pod_cidr = "198.18.16.0/24"
[dataplane]
workers = 1
cores = [1]
poll_mode = "$1"
api_socket = "$run/stromd.sock"
state_dir = "$run"
CFG
  rm -f "$run/ports.json" "$run/tables.cbor"
  ip netns exec $N "$bin/stromd" --config "$run/stromd.toml" --log warn &
  pid=$!
  for _ in $(seq 100); do [ -S "$run/stromd.sock" ] && break; sleep 0.05; done
  for p in a b $(seq -f 'p%g' $((${2:-10} - 2))); do
    ip=$(ip -n "swe-$p" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
    "$bin/stromctl" -s "$run/stromd.sock" add-port --ifname "h$p" --ip "$ip" --mac "$(mac "swe-$p" eth0)" >/dev/null
  done
}
stop() { kill -INT "$pid"; wait "$pid" || true; pid=; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
stat() { "$bin/stromctl" -s "$run/stromd.sock" -o json stats | python3 -c "import json,sys; w=json.load(sys.stdin)['workers'][0]; print(w['loops'], w['counters']['rx_packets'], w['sleeps'])"; }
hz=$(getconf CLK_TCK)
echo "# 1. idle CPU, one worker, registered silent ports, 10 s"
for run_ in "busy 10" "adaptive 10" "adaptive 100"; do
  read -r mode ports <<<"$run_"
  start "$mode" "$ports"; sleep 2
  t0=$(cpu_ticks); read -r l0 _ s0 < <(stat); sleep 10; t1=$(cpu_ticks); read -r l1 _ s1 < <(stat)
  awk -v t=$((t1 - t0)) -v hz="$hz" -v m="$mode" -v n="$ports" -v l=$((l1 - l0)) -v s=$((s1 - s0)) \
    'BEGIN{printf "%-9s %3d ports   cpu %5.1f%% of a core   loops/s %9.0f   sleeps/s %6.1f\n", m, n, t/hz/10*100, l/10, s/10}'
  stop
done
echo "# 2. forwarding, one worker (busy, core 1), strom-pktgen on core 0, 60-byte UDP, 256 flows, ${SECS} s"
start busy; sleep 1
rx() { ip netns exec swe-b cat /sys/class/net/eth0/statistics/rx_packets; }
r0=$(rx); read -r l0 p0 _ < <(stat)
ip netns exec swe-a "$bin/strom-pktgen" send --dev eth0 --cores 0 --duration "$SECS" --interval-ms 0 \
  --dst-mac "$(mac $N ha)" --src-ip 198.18.16.2 --dst-ip 198.18.16.3 --src-port 1024-1279 --dst-port 9 --size 60 &
gen=$!
if command -v perf >/dev/null; then
  sleep 1; perf record -q -C 1 -g -o "$run/perf.data" -- sleep 2 >/dev/null 2>&1 || true
fi
wait $gen; sleep 0.5
r1=$(rx); read -r l1 p1 _ < <(stat)
awk -v n=$((r1 - r0)) -v s="$SECS" -v l=$((l1 - l0)) -v p=$((p1 - p0)) \
  'BEGIN{printf "delivered %.3f Mpps   worker rx %.3f Mpps   frames per loop %.2f\n", n/s/1e6, p/s/1e6, p/l}'
stop
if [ -f "$run/perf.data" ]; then
  echo "# 3. where core 1's time goes (perf, 2 s of the flood; self time, top 20)"
  perf report -i "$run/perf.data" --stdio --no-children --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | head -20
else
  echo "# 3. perf not installed (apt-get install linux-perf): no profile"
fi
