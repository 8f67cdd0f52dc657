#!/usr/bin/env bash
# `make test`: build every test target once, then run the test binaries ETCDMIRROR_TEST_JOBS
# at a time (default 2). Most of a test's time is spent waiting on etcd servers and on the
# timers it tests (a 90 s quiet period, a 15 s watch timeout), not on the CPU, so two at a
# time take about half as long on two cores; every wait in the tests is a bounded poll, so
# a slower machine makes them slower, not wrong. Each binary's output is printed whole when
# it ends, with its time; the run fails, naming them, if any binary fails.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${ETCDMIRROR_TEST_JOBS:-2}"
cargo="${CARGO:-cargo}"

built=$("$cargo" test --all-targets --no-run 2>&1) || { printf '%s\n' "$built" >&2; exit 1; }
printf '%s\n' "$built" | grep -v '^ *Executable' >&2 || true
mapfile -t bins < <(printf '%s\n' "$built" | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
[ "${#bins[@]}" -gt 0 ] || { echo "tests/run.sh: cargo listed no test binary" >&2; exit 1; }

# The longest first, so that the two lanes end close together (times measured with
# `make test` on 2 cores; the others take seconds).
order='window v3_faults v3_network network crash reload mapping shapes members values faults production replication v3'
sorted=()
for stem in $order; do
  for b in "${bins[@]}"; do
    [[ $(basename "$b") == "$stem"-* ]] && sorted+=("$b")
  done
done
for b in "${bins[@]}"; do
  [[ " ${sorted[*]} " == *" $b "* ]] || sorted+=("$b")
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export out
one() {
  local bin=$1 name start status
  name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
  start=$(date +%s)
  if "$bin" >"$out/$name.log" 2>&1; then status=ok; else status=FAILED; : >"$out/$name.failed"; fi
  {
    flock 9
    printf '\n==> %s: %s in %d s\n' "$name" "$status" "$(( $(date +%s) - start ))"
    cat "$out/$name.log"
  } 9>"$out/.print"
}
export -f one
started=$(date +%s)
printf '%s\n' "${sorted[@]}" | xargs -d '\n' -P "$jobs" -I{} bash -c 'one "$1"' _ {} || true
failed=$(cd "$out" && for f in *.failed; do [ -e "$f" ] && printf '%s ' "${f%.failed}"; done; true)
printf '\n%d test binaries in %d s, %d at a time\n' "${#sorted[@]}" "$(( $(date +%s) - started ))" "$jobs"
if [ -n "$failed" ]; then
  echo "FAILED: $failed" >&2
  exit 1
fi
echo "all passed"
