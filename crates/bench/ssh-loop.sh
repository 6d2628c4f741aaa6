#!/bin/sh
# The hand-written baseline certdeploy-bench compares itself with (`--ssh-loop`):
# what an operator would script with plain OpenSSH.
#
#   ssh-loop.sh MANIFEST LANES
#
# MANIFEST lines: TARGET HOST PORT LOCAL_DIR CERT_PATH KEY_PATH CHAIN_PATH
# (LOCAL_DIR holds the files `cert`, `key`, `chain`). LANES loops run in
# parallel; a target always goes to the same lane (TARGET mod LANES), so the
# deployments of one target run one after the other, in manifest order.
#
# Per deployment: one ssh command over the host's ControlMaster (opened on
# first use, kept 60 s): the three files as a tar stream into a fresh 0700
# directory next to the certificate, each renamed over its path, then the
# reload command. No backup, no rollback, no journal, no lock: the floor of
# what a script does, not a safe deployment.
#
# Environment: LOOP_KNOWN_HOSTS, LOOP_IDENTITY, LOOP_USER, LOOP_CONTROL_DIR,
# LOOP_KEX (optional KexAlgorithms), LOOP_RELOAD (the reload command).
set -eu
manifest=$1
lanes=$2
kex=${LOOP_KEX:+-o KexAlgorithms=$LOOP_KEX}

deploy() {
    # $1 target, $2 host, $3 port, $4 local dir, $5 cert, $6 key, $7 chain
    dir=${5%/*}
    tar -C "$4" -cf - cert key chain |
        ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes \
            -o UserKnownHostsFile="$LOOP_KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null \
            -o IdentitiesOnly=yes -i "$LOOP_IDENTITY" $kex \
            -o ControlMaster=auto -o ControlPath="$LOOP_CONTROL_DIR/%C" -o ControlPersist=60 \
            -p "$3" "$LOOP_USER@$2" \
            "set -e; t=\$(mktemp -d '$dir/.loop.XXXXXX'); tar -C \"\$t\" -xf -; chmod 600 \"\$t/key\";
             mv \"\$t/cert\" '$5'; mv \"\$t/key\" '$6'; mv \"\$t/chain\" '$7'; rmdir \"\$t\"; $LOOP_RELOAD"
}

lane=0
pids=
while [ "$lane" -lt "$lanes" ]; do
    (
        awk -v l="$lane" -v n="$lanes" '$1 % n == l' "$manifest" |
            while read -r target host port local cert key chain; do
                deploy "$target" "$host" "$port" "$local" "$cert" "$key" "$chain"
            done
    ) &
    pids="$pids $!"
    lane=$((lane + 1))
done
fail=0
for p in $pids; do
    wait "$p" || fail=1
done
exit $fail
