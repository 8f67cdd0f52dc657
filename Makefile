# etcdmirror: the commands the README and .ci/run use.
#   make build   release binary in target/release/etcdmirror
#   make test    unit + integration tests (needs etcd on PATH: apt-get install etcd-server)
#   make demo    two throwaway etcd servers, one mirrored key
#   make lint    rustfmt + clippy, warnings are errors
#   make vendor  copy all crates into vendor/ for an offline build
#   make clean   remove target/

CARGO ?= cargo

.PHONY: build test demo lint vendor clean check-etcd

build:
	$(CARGO) build --release

check-etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "error: 'etcd' is not on PATH; the tests start real etcd servers." >&2; \
	  echo "       On Debian/Ubuntu: apt-get install etcd-server   (or run .ci/run as root)" >&2; \
	  exit 1; }

test: check-etcd
	$(CARGO) test --all-targets

demo:
	bash tests/demo.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

vendor:
	@echo "Vendoring crates into vendor/; add the snippet below to .cargo/config.toml for offline builds:"
	$(CARGO) vendor --locked vendor

clean:
	$(CARGO) clean
