#!/bin/sh
set -e
nginx
exec /usr/sbin/sshd -D -e
