# Gatehouse — the two commands that matter: `make demo` and `make test`.
# Builds and downloads are cached outside the work tree (~/.cache/gatehouse) so clean clones stay fast.

SHELL := /bin/bash
export GATEHOUSE_CACHE ?= $(HOME)/.cache/gatehouse
export CARGO_TARGET_DIR ?= $(GATEHOUSE_CACHE)/target
export KEYCLOAK_TEST_PORT ?= 18180
export KEYCLOAK_URL ?= http://localhost:$(KEYCLOAK_TEST_PORT)
CARGO ?= cargo

.PHONY: all setup build lint test unit-test demo bench fuzz soak clean-cache

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --locked --release -p gatehouse

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@scripts/check-deps.sh

# Unit tests only (no Keycloak needed).
unit-test: setup
	$(CARGO) test --locked --lib --bins

# Everything: lint, unit tests, and the integration suites against a real Keycloak.
test: lint
	@scripts/test.sh

demo: build
	@scripts/demo.sh $(CARGO_TARGET_DIR)/release/gatehouse

# Fuzz every parser of outside input; FUZZ_SECONDS per target (default 60).
fuzz: setup
	@scripts/fuzz.sh

bench: build
	@scripts/bench.sh $(CARGO_TARGET_DIR)/release/gatehouse
	@scripts/bench-views.sh $(CARGO_TARGET_DIR)/release/gatehouse $(CARGO_TARGET_DIR)/release/examples/baseline
	@scripts/bench-check.sh $(CARGO_TARGET_DIR)/release/gatehouse
	@scripts/bench-oauth2-proxy.sh $(CARGO_TARGET_DIR)/release/gatehouse

# Soak test (not part of `make test`): SOAK_MINUTES (default 30) of mixed traffic on two replicas
# with Redis, Redis and Keycloak restarted during the run; its own Keycloak instance on 18280.
soak: build
	@scripts/soak.sh $(CARGO_TARGET_DIR)/release/gatehouse

clean-cache:
	rm -rf $(GATEHOUSE_CACHE)
