# hsmseal — see README.md. `make demo` and `make test` work on a fresh
# Debian machine: they install what they need (SoftHSM2, PostgreSQL for the
# end-to-end test) first.

CARGO ?= cargo
BIN := target/release/hsmseal

.PHONY: all build deps test unit-test pg-e2e demo bench docs bless lint fmt clean fuzz test-containers spark-e2e parquet-pyarrow

all: build

deps:
	./scripts/install-deps.sh

build:
	$(CARGO) build --release --locked

# Unit, property, Wycheproof and CLI tests (each with its own SoftHSM2 token),
# then the PostgreSQL end-to-end migration test.
test: deps build unit-test pg-e2e

unit-test:
	$(CARGO) test --release --locked

pg-e2e: deps build
	./scripts/install-deps.sh postgresql
	./scripts/pg-e2e.sh $(BIN)

# Tests whose tokens each come from their own container (podman, image built
# locally with mmdebstrap), and the release binary run in a minimal image
# (scripts/test-containers.sh; README "Tests in containers"). Root only;
# compiles the `containers` feature (testcontainers, ~240 crates).
test-containers: deps
	CARGO=$(CARGO) ./scripts/test-containers.sh

# hsmseal as a stage of a Spark job: 1 M rows, 4 partitions in local mode,
# each piped through its own hsmseal (scripts/spark-e2e.sh; README "Running
# on Spark"). Installs OpenJDK headless (Debian) and PySpark (PyPI, a venv
# in .cache/spark-venv, reused) if missing.
spark-e2e: deps build
	./scripts/spark-e2e.sh $(BIN)

# pyarrow reads every Parquet file hsmseal writes, and the decrypted table
# equals the one pyarrow wrote (scripts/parquet-pyarrow.sh; pyarrow from
# PyPI into target/pyarrow-venv, reused). Seconds, plus the download.
parquet-pyarrow: deps build
	./scripts/parquet-pyarrow.sh $(BIN)

demo: deps build
	./scripts/demo.sh $(BIN)

bench: deps build
	./scripts/bench.sh $(BIN)

# Shell completions and man pages, generated from the clap definitions
# (examples/gen-docs.rs), into target/docs/{completions,man}.
docs:
	$(CARGO) run --release --locked --example gen-docs -- target/docs

# Accept the current --help texts and error messages as the snapshots in
# tests/snapshots/ (tests/cli_snapshots.rs); then review `git diff tests/snapshots/`.
bless:
	HSMSEAL_BLESS=1 $(CARGO) test --release --locked --test cli_snapshots

# Every fuzz target (fuzz/, cargo-fuzz + libFuzzer on stable Rust, installed
# into target/fuzz-tools if missing) for FUZZ_SECONDS each (default 40);
# fails on any crash and prints where its input is (scripts/fuzz.sh).
fuzz:
	./scripts/fuzz.sh

# The second clippy: the library alone, as a program depending on it with
# default-features = false builds it (no command-line crates).
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	$(CARGO) clippy --lib --no-default-features --locked -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
	rm -rf target/demo bench-out
