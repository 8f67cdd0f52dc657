#!/usr/bin/env bash
# What `make demo`, `make test` and .ci/run need from the system, in one list, and how to get
# it on Debian: `bash tests/deps.sh NEED...` (NEED: demo, test, etcd, ci; the Makefile's
# `deps` target is `test`). Silent when everything is there. Otherwise, as root, it installs
# what is missing (apt-get update, then apt-get install; Python's prometheus_client with pip,
# or Debian's python3-prometheus-client where pip is refused); as any other user, or with
# ETCDMIRROR_NO_INSTALL=1, it stops with one line naming the command to run.
set -euo pipefail

# command          Debian package              needed by
LIST='
etcd               etcd-server                 demo test etcd
etcdctl            etcd-client                 test
curl|python3       curl                        demo
make               make                        test ci
systemd-analyze    systemd                     test
man                man-db                      test
mandoc             mandoc                      test
openssl            openssl                     test
promtool           prometheus                  test
python3            python3                     test
py:prometheus_client python3-prometheus-client test
'
# Why each is there (tests/*.rs name the package again when a tool is missing):
#   etcd: every integration test and the demo start real etcd 3.4 servers (v2 API).
#   etcdctl (etcd-client): the v3 tests cross-check a v3 replica with `etcdctl get`.
#   curl or python3: the demo's HTTP client. make: packaging.rs runs make install.
#   systemd-analyze (systemd), man (man-db), mandoc: packaging.rs checks the unit and the
#   man page. openssl: production.rs makes TLS certificates. promtool (prometheus):
#   alerting.rs checks and unit-tests src/etcdmirror.rules.yml. python3 with
#   prometheus_client: production.rs parses /metrics with it.

[ $# -gt 0 ] || { echo "usage: $0 NEED... (demo, test, etcd, ci)" >&2; exit 2; }
needs=" $* "

has() { # has COMMAND: one of a|b|c is on PATH, or py:MODULE imports
  local alt
  if [[ $1 == py:* ]]; then
    command -v python3 >/dev/null 2>&1 && python3 -c "import ${1#py:}" >/dev/null 2>&1
    return
  fi
  IFS='|' read -ra alt <<<"$1"
  for c in "${alt[@]}"; do command -v "$c" >/dev/null 2>&1 && return 0; done
  return 1
}

missing=() commands=() packages=() module= modpkg=
while read -r cmd pkg tags; do
  [ -n "$cmd" ] || continue
  wanted=
  for t in $tags; do [[ $needs == *" $t "* ]] && wanted=1; done
  [ -n "$wanted" ] || continue
  has "$cmd" && continue
  what=${cmd#py:}
  missing+=("${what//|/ or } ($pkg)")
  commands+=("$cmd")
  if [[ $cmd == py:* ]]; then module=${cmd#py:} modpkg=$pkg; else packages+=("$pkg"); fi
done <<<"$LIST"
[ ${#missing[@]} -eq 0 ] && exit 0

# Debian's python3-* packages serve Debian's python3 only: another python3 (pyenv, venv)
# gets the module from pip.
system_python() {
  ! command -v python3 >/dev/null 2>&1 ||
    [ "$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null)" = /usr ]
}

apt_cmd="apt-get update && apt-get install -y --no-install-recommends"
if [ "${EUID:-$(id -u)}" != 0 ] || [ "${ETCDMIRROR_NO_INSTALL:-}" = 1 ]; then
  apt=("${packages[@]}") pip=
  if [ -n "$module" ]; then
    if system_python; then apt+=("$modpkg"); else pip="python3 -m pip install ${module//_/-}"; fi
  fi
  run=
  [ ${#apt[@]} -gt 0 ] && run="sudo sh -c '$apt_cmd ${apt[*]}'"
  [ -n "$pip" ] && run="${run:+$run && }$pip"
  list=$(printf '%s, ' "${missing[@]}")
  echo "tests/deps.sh $*: missing ${list%, }; run: $run   (as root, make installs them itself)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> installing from Debian: ${packages[*]}"
  apt-get update
  apt-get install -y --no-install-recommends "${packages[@]}"
fi
if [ -n "$module" ] && ! has "py:$module"; then
  echo "==> installing Python's ${module//_/-} for $(command -v python3)"
  # A Debian system Python refuses pip (PEP 668, externally managed): use its package then.
  if system_python || ! python3 -m pip install --quiet "${module//_/-}"; then
    [ ${#packages[@]} -gt 0 ] || apt-get update
    apt-get install -y --no-install-recommends "$modpkg"
  fi
fi
for i in "${!commands[@]}"; do
  has "${commands[$i]}" ||
    { echo "tests/deps.sh: ${missing[$i]} is still missing after the install" >&2; exit 1; }
done
