# etcdmirror: the commands the README and .ci/run use.
#   make build   release binary in target/release/etcdmirror
#   make test    unit + integration tests (real etcd servers, plus the tools in tests/deps.sh)
#   make demo    two throwaway etcd servers, one mirrored key
#   make deps    what `make test` needs from the system (tests/deps.sh holds the one list):
#                installed when missing if run as root, otherwise one line naming the
#                command to run; `test`, `demo`, `bench` and `soak` check it first
#   make lint    rustfmt + clippy, warnings are errors
#   make bench   performance harness (tests/bench.rs, release binary, own etcd servers on
#                /dev/shm; about 11 minutes, of which about 2 for the v3 destination;
#                ETCDMIRROR_BENCH_ONLY=v3 runs only those): prints a table, writes
#                target/bench/results.json
#   make soak    long mixed workload with faults, kills and etcd restarts (tests/soak.rs;
#                SOAK_SECS, default 900; SOAK_API v2 (default), v2v3 for a v2 source into
#                a v3 destination, v3 for v3 to v3): prints a summary, writes
#                target/soak/summary.txt (summary-v2v3.txt, summary-v3.txt)
#   make vendor  copy all crates into vendor/ for an offline build
#   make offline-check  prove `cargo build --offline --locked --release` works from vendor/
#                with an empty CARGO_HOME (release build in a temporary target dir)
#   make install / uninstall  binary, man page, systemd unit, example defaults file,
#                Prometheus alerting rules (DESTDIR, PREFIX, BINDIR, MANDIR, UNITDIR,
#                DATADIR, SYSCONFDIR, BIN; see below)
#   make clean   remove target/

CARGO ?= cargo
INSTALL ?= install

# Install layout. Everything but the example defaults file lives under PREFIX; systemd
# reads units from /usr/local/lib/systemd/system as well as /usr/lib/systemd/system, so
# the default UNITDIR works for both PREFIX=/usr/local and PREFIX=/usr. DESTDIR is
# prepended to every path (staging for packages); the unit's ExecStart is rewritten to
# $(BINDIR)/etcdmirror, without DESTDIR. BIN is the binary to install: the release
# binary, built first when missing or older than the sources.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
DESTDIR ?=
BIN ?= target/release/etcdmirror

# Source replacement for offline builds from vendor/ (the same as the snippet that
# `cargo vendor` prints for .cargo/config.toml, given on the command line instead).
VENDOR_CONFIG = --config 'source.crates-io.replace-with="vendored-sources"' \
                --config 'source.vendored-sources.directory="$(CURDIR)/vendor"'

.PHONY: build test bench soak demo deps lint vendor offline-check install uninstall clean

build:
	$(CARGO) build --release

# tests/deps.sh NEED (demo, test, etcd): silent when all is there; as root it installs what
# is missing (apt-get, pip); as another user it stops with one line naming the command.
deps:
	bash tests/deps.sh test

# Every test target, the binaries two at a time (tests/run.sh says why; ETCDMIRROR_TEST_JOBS=1
# for one at a time, as `cargo test --all-targets` runs them).
test: deps
	CARGO="$(CARGO)" bash tests/run.sh

# The harness is a test target with harness = false that only runs when ETCDMIRROR_BENCH=1;
# it measures the release binary (ETCDMIRROR_BIN overrides which one).
bench:
	bash tests/deps.sh etcd
	$(CARGO) build --release
	ETCDMIRROR_BENCH=1 $(CARGO) test --release --test bench

SOAK_SECS ?= 900
SOAK_API ?= v2
soak:
	bash tests/deps.sh etcd
	$(CARGO) build --release
	ETCDMIRROR_SOAK=1 ETCDMIRROR_SOAK_SECS=$(SOAK_SECS) ETCDMIRROR_SOAK_API=$(SOAK_API) \
	  $(CARGO) test --release --test soak

demo:
	bash tests/deps.sh demo
	bash tests/demo.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

vendor:
	@echo "Vendoring crates into vendor/; for an offline build either add the snippet below to"
	@echo ".cargo/config.toml, or pass it on the command line as \`make offline-check' does:"
	@echo "  cargo build --offline --locked --release \\"
	@echo "    --config 'source.crates-io.replace-with=\"vendored-sources\"' \\"
	@echo "    --config 'source.vendored-sources.directory=\"$(CURDIR)/vendor\"'"
	$(CARGO) vendor --locked vendor

# Re-vendors (so vendor/ matches Cargo.lock), then builds with an empty CARGO_HOME, so no
# registry cache or index can help, in a temporary target dir, so target/ is untouched.
# RUSTUP_HOME is pinned so the rustup proxy still finds the toolchain.
offline-check: vendor
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir "$$tmp/cargo-home"; \
	if command -v rustup >/dev/null 2>&1; then \
	  RUSTUP_HOME=$$(rustup show home); export RUSTUP_HOME; fi; \
	echo "offline build: CARGO_HOME=$$tmp/cargo-home (empty), target dir $$tmp/target"; \
	CARGO_HOME="$$tmp/cargo-home" $(CARGO) build --offline --locked --release \
	  --target-dir "$$tmp/target" $(VENDOR_CONFIG); \
	"$$tmp/target/release/etcdmirror" --version; \
	if [ -e "$$tmp/cargo-home/registry" ] || [ -e "$$tmp/cargo-home/git" ]; then \
	  echo "offline-check: cargo used a registry or git source, not only vendor/" >&2; \
	  exit 1; fi; \
	echo "offline-check: OK (built from vendor/ only)"

target/release/etcdmirror: Cargo.toml Cargo.lock $(shell find src -name '*.rs')
	$(CARGO) build --release

install: $(BIN)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(UNITDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(DATADIR)/etcdmirror
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/etcdmirror
	$(INSTALL) -m 0644 src/etcdmirror.1 $(DESTDIR)$(MANDIR)/man1/etcdmirror.1
	sed 's|^ExecStart=/usr/local/bin/etcdmirror |ExecStart=$(BINDIR)/etcdmirror |' \
	  etcdmirror.service > $(DESTDIR)$(UNITDIR)/etcdmirror.service.tmp
	grep -q '^ExecStart=$(BINDIR)/etcdmirror ' $(DESTDIR)$(UNITDIR)/etcdmirror.service.tmp
	chmod 0644 $(DESTDIR)$(UNITDIR)/etcdmirror.service.tmp
	mv $(DESTDIR)$(UNITDIR)/etcdmirror.service.tmp $(DESTDIR)$(UNITDIR)/etcdmirror.service
	$(INSTALL) -m 0644 src/etcdmirror.default $(DESTDIR)$(SYSCONFDIR)/default/etcdmirror.example
	$(INSTALL) -m 0644 src/etcdmirror.rules.yml $(DESTDIR)$(DATADIR)/etcdmirror/etcdmirror.rules.yml

# Removes exactly the files `install` writes (directories are left, they may be shared,
# except $(DATADIR)/etcdmirror, ours, when empty; /etc/default/etcdmirror, your copy of the
# example, is left alone).
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/etcdmirror \
	  $(DESTDIR)$(MANDIR)/man1/etcdmirror.1 \
	  $(DESTDIR)$(UNITDIR)/etcdmirror.service \
	  $(DESTDIR)$(SYSCONFDIR)/default/etcdmirror.example \
	  $(DESTDIR)$(DATADIR)/etcdmirror/etcdmirror.rules.yml
	if [ -d $(DESTDIR)$(DATADIR)/etcdmirror ]; then \
	  rmdir --ignore-fail-on-non-empty $(DESTDIR)$(DATADIR)/etcdmirror; fi

clean:
	$(CARGO) clean
