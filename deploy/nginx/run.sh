#!/bin/sh
# Starts nginx with docker-compose.yml's balancer config. nginx re-resolves
# the replicas through `resolver`, which takes an address, not a file: write
# the container's own DNS server (Docker: 127.0.0.11; podman: the network's
# gateway) from resolv.conf into resolver.conf, which nginx.conf includes.
set -eu
ns=$(sed -n 's/^nameserver[[:space:]]\{1,\}\([^[:space:]]\{1,\}\).*/\1/p' /etc/resolv.conf | head -n 1)
case "$ns" in
  "") echo "run.sh: no nameserver in /etc/resolv.conf" >&2; exit 1 ;;
  *:*) ns="[$ns]" ;;
esac
echo "resolver $ns valid=5s ipv6=off;" > /etc/nginx/resolver.conf
exec nginx -g 'daemon off;'
