#!/usr/bin/env bash
# Build the image on a locally made Debian base (official images cannot be pulled here), run it,
# and check that it serves, reports healthy, runs as non-root and stops gracefully.
# Needs: a running Docker engine, debootstrap, curl. Usage: scripts/docker-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=kvm-memattr-base:bookworm
IMAGE=kvm-memattr:smoke
PORT=${PORT:-18080}
# The Debian mirror this machine's apt already uses (deb822 sources or the classic list).
mirror_from_apt() {
  { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
    grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'
  } | grep -v -i security | head -n 1 || true  # no match is not an error: the caller says what to do
}
MIRROR=${MIRROR:-$(mirror_from_apt)}
if [ -z "$MIRROR" ]; then
  echo "no Debian mirror in this machine's apt sources: set MIRROR=<url>" >&2
  exit 2
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "== making $BASE with debootstrap"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" >/dev/null
  # The host's trust store, and pip told to use it: registries are reached the way this host reaches them.
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$root"
fi

echo "== docker build"
docker build --network host --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" . >/dev/null
docker image ls "$IMAGE" --format 'image {{.Repository}}:{{.Tag}} {{.Size}}'

echo "== docker run (host network, port $PORT)"
cid=$(docker run -d --network host -e KVM_MEMATTR_PORT="$PORT" "$IMAGE")
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
echo "healthz: $(curl -fsS "http://127.0.0.1:$PORT/healthz")"
vm=$(curl -fsS -XPOST "http://127.0.0.1:$PORT/v1/vms" -H 'content-type: application/json' -d '{"semantics":"rfc-v9"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "unreg-region: $(curl -fsS -XPOST "http://127.0.0.1:$PORT/v1/vms/$vm/memory-encrypt/unreg-region" -H 'content-type: application/json' -d '{"addr":"0x100000000","size":"0x200000"}' | head -c 160)..."
echo "docs: HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/docs"), swagger js HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/static-offline-docs/swagger-ui-bundle.js")"
echo "memory map: / -> $(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' "http://127.0.0.1:$PORT/"), /ui HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ui"), app.js HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ui/static/app.js")"
echo "state dir: $(docker exec "$cid" stat -c '%U:%G %a' /var/lib/kvm-memattr/state)"
echo "user in container: $(docker exec "$cid" id -u):$(docker exec "$cid" id -g)"
status=starting
for _ in $(seq 1 40); do
  status=$(docker inspect --format '{{.State.Health.Status}}' "$cid")
  [ "$status" = healthy ] && break
  sleep 0.5
done
echo "HEALTHCHECK: $status"
start=$(date +%s.%N)
docker stop -t 20 "$cid" >/dev/null
echo "stopped in $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s, exit code $(docker inspect --format '{{.State.ExitCode}}' "$cid")"
docker logs "$cid" 2>&1 | tail -n 3
[ "$status" = healthy ]
