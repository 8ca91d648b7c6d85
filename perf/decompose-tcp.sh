#!/bin/bash
# Kernel forwarding between two pods (no XDP anywhere): what the pods' MTU and offloads alone
# give one TCP stream. Namespaces dcA, dcN, dcB; torn down at the end.
set -u
P=dc
cleanup() { for n in a n b; do ip netns del $P$n 2>/dev/null; done; }
trap cleanup EXIT
cleanup
for n in a n b; do ip netns add $P$n; ip -n $P$n link set lo up; done
ip link add ha netns ${P}n type veth peer name eth0 netns ${P}a
ip link add hb netns ${P}n type veth peer name eth0 netns ${P}b
ip -n ${P}n addr add 198.18.1.1/24 dev ha; ip -n ${P}n addr add 198.18.2.1/24 dev hb
ip -n ${P}a addr add 198.18.1.2/24 dev eth0; ip -n ${P}b addr add 198.18.2.2/24 dev eth0
for x in "${P}a eth0" "${P}b eth0" "${P}n ha" "${P}n hb"; do set -- $x; ip -n $1 link set $2 up; done
ip -n ${P}a route add default via 198.18.1.1; ip -n ${P}b route add default via 198.18.2.1
ip netns exec ${P}n sysctl -qw net.ipv4.ip_forward=1
setup() { # mtu offload
  for x in "${P}a eth0" "${P}b eth0" "${P}n ha" "${P}n hb"; do set -- $x; ip -n $1 link set $2 mtu $MTU; done
  for n in a b; do ip netns exec $P$n ethtool -K eth0 tx $OFF tso $OFF gso $OFF >/dev/null 2>&1; done
}
run() {
  ip netns exec ${P}b iperf3 -s -1 -D -p 5201 >/dev/null 2>&1; sleep 0.3
  ip netns exec ${P}a iperf3 -c 198.18.2.2 -p 5201 -t 4 -J | python3 -c 'import json,sys; v=json.load(sys.stdin); print("%.2f" % (v["end"]["sum_received"]["bits_per_second"]/1e9))'
}
for round in 1 2 3 4 5; do
  for cfg in "1500 on" "65000 off" "65000 on" "1500 off"; do
    set -- $cfg; MTU=$1; OFF=$2; setup
    echo "round $round mtu $MTU offloads $OFF: $(run) Gbit/s"
  done
done
