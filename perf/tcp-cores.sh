#!/bin/bash
# Where the cores go during one TCP stream pod a -> pod b through stromd (one worker, busy
# polling, pinned to core 1; iperf3's client pinned to core 0). Run from the repository, as
# root, after a release build; the lab is torn down at the end.
set -u
DIR=$(mktemp -d /tmp/strom-tcp-cores.XXXX)
cat > $DIR/pods.yaml <<'YAML'
---
kind: Pod
metadata: { name: a, namespace: t }
spec: { containers: [ { name: c } ] }
---
kind: Pod
metadata: { name: b, namespace: t }
spec: { containers: [ { name: c } ] }
YAML
L="target/release/strom-lab --dir $DIR"
$L up $DIR/pods.yaml --prefix mx --cores 1 --poll-mode busy >/dev/null 2>&1 || exit 1
PID=$(python3 -c "import json;print(json.load(open('$DIR/state.json'))['stromd'])")
TID=$(ps -L -o tid=,comm= -p $PID | awk '/strom-worker-0/{print $1}')
$L exec t/b -- iperf3 -s -1 -D >/dev/null 2>&1; sleep 0.5
B=$(python3 -c "import json;print(json.load(open('$DIR/state.json'))['pods']['t/b']['ip'])")
($L exec t/a -- taskset -c 0 iperf3 -c $B -t 7 > /tmp/cpu-iperf.txt 2>&1 &)
sleep 2
snap() { grep -E "^cpu[01] " /proc/stat; awk '{print "worker", $14, $15}' /proc/$PID/task/$TID/stat; }
A=$(snap); sleep 4; B=$(snap)
python3 - "$A" "$B" <<'PY'
import sys
a, b = sys.argv[1].splitlines(), sys.argv[2].splitlines()
names = ["user","nice","system","idle","iowait","irq","softirq","steal"]
for la, lb in zip(a, b):
    fa, fb = la.split(), lb.split()
    if fa[0] == "worker":
        d = [int(y) - int(x) for x, y in zip(fa[1:], fb[1:])]
        tot = 400  # 4 s of 100 ticks
        print("stromd worker thread: user %.0f%%, kernel %.0f%% of a core" % (100*d[0]/tot, 100*d[1]/tot))
        continue
    d = [int(y) - int(x) for x, y in zip(fa[1:9], fb[1:9])]
    t = sum(d)
    print(fa[0], ", ".join("%s %.0f%%" % (n, 100*v/t) for n, v in zip(names, d) if v))
PY
sleep 2; grep sender /tmp/cpu-iperf.txt
$L down --prefix mx >/dev/null 2>&1
rm -rf "$DIR"
