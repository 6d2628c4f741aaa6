#!/usr/bin/env bash
# Keys for docker-compose.yml: the worker's client key, the demo target's
# host key, and the matching known_hosts line (strict host key checking).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p keys
[ -f keys/id_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -C certdeploy -f keys/id_ed25519
[ -f keys/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -C demo-target -f keys/ssh_host_ed25519_key
echo "demo-target $(cut -d' ' -f1,2 keys/ssh_host_ed25519_key.pub)" > keys/known_hosts
echo "keys written to $(pwd)/keys"
