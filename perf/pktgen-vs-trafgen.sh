#!/usr/bin/env bash
# strom-pktgen against trafgen (netsniff-ng) on one veth pair, side by side in one run:
#   ns spg-a (sender, eth0 198.18.3.1) ══ veth ══ ns spg-b (eth0 198.18.3.2, nftables drops UDP :9)
# Same traffic for both: 60-byte UDP frames over 256 flows (source ports), one thread pinned to
# core 0, the same duration, interleaved rounds. Delivered packets are counted on the receiving
# veth (rx_packets), so both senders are measured by the same counter. Then one strom-pktgen
# send -> sink run shows per-flow loss and latency.
# Usage (root): perf/pktgen-vs-trafgen.sh [-s seconds] [-r rounds]   Results: stdout (+ JSON with -j FILE)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${STROM_BIN:-$here/target/release}
SECS=5; ROUNDS=3; JSON=
while getopts "s:r:j:" o; do case $o in s) SECS=$OPTARG;; r) ROUNDS=$OPTARG;; j) JSON=$OPTARG;; *) exit 2;; esac; done
dpkg-query -W -f='${Status}' netsniff-ng 2>/dev/null | grep -q "install ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends netsniff-ng >/dev/null
[ -x "$bin/strom-pktgen" ] || (cd "$here" && cargo build --release --locked -p strom-perf)
A=spg-a; B=spg-b; work=$(mktemp -d /tmp/spg.XXXXXX)
teardown() { ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true; rm -rf "$work"; }
trap teardown EXIT
teardown; work=$(mktemp -d /tmp/spg.XXXXXX)
ip netns add $A; ip netns add $B
for ns in $A $B; do ip -n $ns link set lo up; done
ip link add eth0 netns $A type veth peer name eth0 netns $B
ip -n $A addr add 198.18.3.1/24 dev eth0; ip -n $B addr add 198.18.3.2/24 dev eth0
ip -n $A link set eth0 up; ip -n $B link set eth0 up
MAC_A=$(ip netns exec $A cat /sys/class/net/eth0/address)
MAC_B=$(ip netns exec $B cat /sys/class/net/eth0/address)
ip netns exec $B nft -f - <<NFT
table inet sink {
  chain pre { type filter hook prerouting priority -300; udp dport 9 drop; }
}
NFT
rx() { ip netns exec $B cat /sys/class/net/eth0/statistics/rx_packets; }
mh=$(echo "$MAC_B" | sed 's/^/0x/; s/:/, 0x/g'); ma=$(echo "$MAC_A" | sed 's/^/0x/; s/:/, 0x/g')
cat >"$work/udp.cfg" <<CFG
{ $mh, $ma, c16(0x0800),
  0x45, 0, c16(46), c16(0), 0x40, 0, 64, 17, csumip(14, 33),
  198, 18, 3, 1, 198, 18, 3, 2,
  0x04, dinc(0, 255), c16(9), c16(26), c16(0),
  fill(0x61, 18) }
CFG
run_trafgen() {
  ip netns exec $A timeout -s INT "$SECS" taskset -c 0 trafgen -o eth0 -i "$work/udp.cfg" -P 1 -q -C >/dev/null 2>&1 || true
}
run_pktgen() {
  ip netns exec $A "$bin/strom-pktgen" send --dev eth0 --cores 0 --duration "$SECS" --interval-ms 0 \
    --dst-mac "$MAC_B" --src-ip 198.18.3.1 --dst-ip 198.18.3.2 --src-port 1024-1279 --dst-port 9 \
    --size 60 >/dev/null
}
measure() { local r0 r1; r0=$(rx); "run_$1"; sleep 0.5; r1=$(rx); awk -v n=$((r1-r0)) -v s="$SECS" 'BEGIN{printf "%.3f", n/s/1e6}'; }
echo "# sender round delivered_mpps  (60-byte UDP, 256 flows, core 0, secs=$SECS)"
for r in $(seq 1 "$ROUNDS"); do
  for g in trafgen pktgen; do echo "$g $r $(measure $g)"; done
done | tee "$work/results.txt"
awk '{v[$1]=v[$1]" "$3} END{for(k in v){n=split(v[k],a," "); for(i=1;i<=n;i++)for(j=i+1;j<=n;j++)if(a[j]<a[i]){t=a[i];a[i]=a[j];a[j]=t}; m[k]=a[int((n+1)/2)]}
  printf "# medians: trafgen %s Mpps, strom-pktgen %s Mpps, ratio %.2f\n", m["trafgen"], m["pktgen"], m["pktgen"]/m["trafgen"]}' "$work/results.txt"
# One run into the sink: per-flow loss, reordering and latency at a fixed rate.
ip netns exec $B nft flush ruleset
ip netns exec $B "$bin/strom-pktgen" sink --dev eth0 --cores 1 --duration $((SECS + 2)) --interval-ms 0 --top 3 \
  ${JSON:+--json "$JSON"} >"$work/sink.txt" &
sink=$!; sleep 1
ip netns exec $A "$bin/strom-pktgen" send --dev eth0 --cores 0 --duration "$SECS" --interval-ms 0 \
  --dst-mac "$MAC_B" --src-ip 198.18.3.1 --dst-ip 198.18.3.2 --src-port 1024-1279 --dst-port 9 \
  --size imix --rate 100000
wait $sink
cat "$work/sink.txt"
