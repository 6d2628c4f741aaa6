#!/bin/sh
# The benchmark's network shapes, one after the other (see the README's
# Performance section). Build first:
#   cargo build --release -p certdeploy -p certdeploy-bench
#   crates/bench/shapes.sh            # full size
#   SCALE=0.2 crates/bench/shapes.sh  # every count scaled down
# (a) 1,000 requests over 20 hosts, the default configuration (no
#     pre-opened masters), journal fsync and off, and the ssh loop;
# (b) 1,000 deployments over 1,000 targets on 200 hosts behind a 20 ms
#     round trip, every master opened during the run, with OpenSSH's
#     default key exchange and with curve25519-sha256: the floor and the
#     ratio to it, and the ssh loop;
# (c) 10,000 requests queued before the worker starts, over 2,000 targets
#     on 500 hosts: peak PSS of the worker and its ssh processes, ssh
#     processes at peak (at most max_masters).
set -eu
bench=${BENCH:-target/release/certdeploy-bench}
scale=${SCALE:-1}
n() { awk -v n="$1" -v s="$scale" 'BEGIN { v = int(n * s); print (v < 1 ? 1 : v) }'; }

echo "== (a) $(n 1000) requests over 20 hosts, default configuration"
"$bench" --n "$(n 1000)" --hosts 20 --cold --runs broker-fsync,broker-off --ssh-loop

for kex in "" curve25519-sha256; do
    echo "== (b) $(n 1000) deployments over $(n 1000) targets on $(n 200) hosts, 20 ms RTT, kex ${kex:-default}"
    "$bench" --n "$(n 1000)" --hosts "$(n 200)" --targets-per-host 5 --rtt-ms 20 --cold --floor \
        ${kex:+--kex "$kex"} --runs broker-fsync --ssh-loop
done

echo "== (c) $(n 10000) queued over $(n 2000) targets on $(n 500) hosts"
"$bench" --n "$(n 10000)" --hosts "$(n 500)" --targets-per-host 4 --queued-first --cold --pss --runs broker-fsync
