# pg_twotower — the two commands of the contract are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:/usr/lib/postgresql/15/bin:$(PATH)
PGRX_TEST_ENV := CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA=/tmp/pgrx-pgdata

.PHONY: lint test-deps test-packaging test-golden demo test bench package setup install install-release test-core test-pg test-regress test-tap soak clean

## Set up a fresh Debian 12 machine, build, install, start a scratch cluster and run the demo.
demo: setup install-release
	bash scripts/demo.sh

## Every test: core unit tests, #[pg_test]s, SQL regression, cluster (TAP) tests.
test: setup lint test-deps test-packaging test-core test-golden test-pg install test-regress test-tap

## The benchmark program (1M x 64 by default; see docs/benchmarks.md).
bench: setup install-release
	bash bench/run.sh

## An installable tarball (library, control file, SQL scripts) for servers without Rust.
package: setup
	bash scripts/package.sh

setup:
	bash scripts/setup.sh

install:
	bash scripts/install.sh

install-release:
	bash scripts/install.sh --release

## Gates: rustfmt and clippy (workspace lints included) must find nothing.
lint:
	bash scripts/lint.sh

## Optional test dependencies: pgvector (for tests/t/016_pgvector.pl) and Citus (for
## tests/t/018_citus.pl; from TT_CITUS_TARBALL where no package exists), each skipped without it.
test-deps:
	bash scripts/pgvector.sh || echo "note: pgvector could not be installed: tests/t/016_pgvector.pl will be skipped" >&2
	bash scripts/citus.sh || echo "note: Citus could not be installed: tests/t/018_citus.pl will be skipped" >&2

## Packaging checks (docker/, .dockerignore, make package's instructions).
test-packaging:
	bash tests/packaging.sh

## The numpy reference's own self-test (tests/golden/test_tower_ref.py).
test-golden:
	bash tests/golden.sh

test-core:
	cargo test -p twotower-metric -p twotower-ann -p twotower-tower -p twotower-train -p twotower-cf -p twotower-funnel

test-pg:
	$(PGRX_TEST_ENV) cargo pgrx test pg15

test-regress:
	bash tests/regress.sh

test-tap:
	bash tests/tap.sh

## The one-hour soak: mixed pgbench load with faults (tests/t/014_soak.pl; TT_SOAK_SECONDS to
## change its length), its report and docs/soak.png.
soak: setup install-release
	bash tests/soak.sh

clean:
	cargo clean
	rm -rf /tmp/pg_twotower-* /tmp/pgrx-pgdata
