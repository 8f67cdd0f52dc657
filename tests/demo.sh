#!/usr/bin/env bash
# make demo: start two throwaway etcd v2 servers (source and destination) on free
# loopback ports, run etcdmirror between them, write one key on the source and
# show it arriving on the replica. Everything is removed again on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

command -v etcd >/dev/null 2>&1 ||
  die "'etcd' is not on PATH. On Debian/Ubuntu: apt-get install etcd-server (etcd 3.4, v2 API)."

# --- HTTP helpers: curl if present, else python3 urllib --------------------------
if command -v curl >/dev/null 2>&1; then
  http_get() { curl -sS --max-time 3 "$1"; }
  # http_put URL VALUE  (form-encoded value=VALUE, like etcdctl/curl -d)
  http_put() { curl -sS --max-time 3 -X PUT --data-urlencode "value=$2" "$1"; }
elif command -v python3 >/dev/null 2>&1; then
  http_get() {
    python3 - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
except urllib.error.HTTPError as e:
    r = e
sys.stdout.write(r.read().decode())
EOF
  }
  http_put() {
    python3 - "$1" "$2" <<'EOF'
import sys, urllib.request, urllib.parse, urllib.error
body = urllib.parse.urlencode({"value": sys.argv[2]}).encode()
req = urllib.request.Request(sys.argv[1], data=body, method="PUT")
req.add_header("Content-Type", "application/x-www-form-urlencoded")
try:
    r = urllib.request.urlopen(req, timeout=3)
except urllib.error.HTTPError as e:
    r = e
sys.stdout.write(r.read().decode())
EOF
  }
else
  die "need curl or python3 for HTTP (apt-get install curl)"
fi

# "value" field of an etcd v2 JSON response (good enough for the demo's plain values)
json_value() { sed -n 's/.*"node":{[^}]*"value":"\([^"]*\)".*/\1/p'; }

# --- scratch dir and cleanup ---------------------------------------------------------
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  WORK=$(mktemp -d /dev/shm/etcdmirror-demo.XXXXXX)
else
  WORK=$(mktemp -d -t etcdmirror-demo.XXXXXX)
fi
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- ports: 4 free loopback ports (client+peer for each server) -------------------
if command -v python3 >/dev/null 2>&1; then
  read -r SRC_C SRC_P DST_C DST_P < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
else
  base=$((30000 + RANDOM % 20000))
  SRC_C=$base SRC_P=$((base + 1)) DST_C=$((base + 2)) DST_P=$((base + 3))
fi
SRC=http://127.0.0.1:$SRC_C
DST=http://127.0.0.1:$DST_C

start_etcd() { # name client_port peer_port
  local name=$1 c=$2 p=$3
  etcd --name "$name" --data-dir "$WORK/$name.data" --enable-v2=true \
    --initial-cluster-token "etcdmirror-demo-$name" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$name=http://127.0.0.1:$p" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

wait_etcd() { # name url
  local name=$1 url=$2 deadline=$((SECONDS + 10))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if http_get "$url/v2/keys/" 2>/dev/null | grep '"action":"get"' >/dev/null; then return 0; fi
    sleep 0.1
  done
  tail -n 20 "$WORK/$name.log" >&2
  die "etcd '$name' did not answer on $url within 10 s (log above)"
}

say "etcd: $(etcd --version | sed -n 1p)"
say "starting source etcd on $SRC and destination etcd on $DST (data in $WORK)"
start_etcd src "$SRC_C" "$SRC_P"
start_etcd dst "$DST_C" "$DST_P"
wait_etcd src "$SRC"
wait_etcd dst "$DST"

say "building etcdmirror (cargo build --release)"
cargo build --release -q
BIN=${CARGO_TARGET_DIR:-target}/release/etcdmirror

say "running: etcdmirror --port 0 --reload $SRC $DST"
RUST_LOG=${RUST_LOG:-info} "$BIN" --port 0 --reload "$SRC" "$DST" >"$WORK/mirror.log" 2>&1 &
MIRROR=$!
PIDS+=("$MIRROR")

mirror_alive() {
  kill -0 "$MIRROR" 2>/dev/null && return 0
  local rc=0
  wait "$MIRROR" || rc=$?
  echo "--- etcdmirror log ---" >&2
  cat "$WORK/mirror.log" >&2
  die "etcdmirror exited early with status $rc (log above)"
}

deadline=$((SECONDS + 10))
until grep -q 'Starting replication at' "$WORK/mirror.log"; do
  mirror_alive
  if [ "$SECONDS" -ge "$deadline" ]; then
    cat "$WORK/mirror.log" >&2
    die "no 'Starting replication at' in the etcdmirror log within 10 s"
  fi
  sleep 0.1
done

say "writing /demo/hello=world on the source"
http_put "$SRC/v2/keys/demo/hello" world >/dev/null
source_value=$(http_get "$SRC/v2/keys/demo/hello" | json_value)

replica_value=
deadline=$((SECONDS + 10))
while [ "$SECONDS" -lt "$deadline" ]; do
  replica_value=$(http_get "$DST/v2/keys/replica/demo/hello" 2>/dev/null | json_value || true)
  [ -n "$replica_value" ] && break
  mirror_alive
  sleep 0.1
done

echo
echo "  source:  $SRC/v2/keys/demo/hello          = ${source_value:-<missing>}"
echo "  replica: $DST/v2/keys/replica/demo/hello  = ${replica_value:-<missing>}"
echo
echo "--- etcdmirror log ---"
cat "$WORK/mirror.log"
echo "----------------------"

if [ "$replica_value" != "world" ]; then
  die "the key did not arrive on the replica within 10 s"
fi
say "OK: the key written on the source appeared on the replica"
