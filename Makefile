# medledger: the one entry point. `up`, `demo`, `test` and `bench` run `setup` first, so each
# works alone on a fresh machine.
.PHONY: setup up demo test lint bench chaos reset

setup:
	@bash tools/setup.sh

up: setup
	uv run --frozen medledger up

# The whole story against the stack of `make up` if one runs, else on a stack of its own
# (embedded defaults, free ports, a temporary folder) that it stops and removes at the end.
demo: setup
	uv run --frozen medledger demo

test: setup
	@bash tools/run_tests.sh

lint: setup
	uv run --frozen python tools/check_repo_paths.py
	uv run --frozen ruff check .
	uv run --frozen ruff format --check .
	uv run --frozen mypy libs/verifier/src libs/runtime/src libs/sdk/src libs/devstack/src services/*/src
	uv run --frozen lint-imports --no-cache
	cd protos && ../tools/npm/node_modules/.bin/buf lint

bench: setup
	uv run --frozen python bench/run.py

# Faults under load against the multi-process stack on a PostgreSQL cluster of its own: every
# service SIGKILLed and restarted, PostgreSQL stopped 10 s, the chain stopped 30 s, OpenBao
# stopped 10 s and sealed 5 s; then the
# invariants (nothing lost, nothing duplicated, the log verifies, every entry anchored).
chaos: setup
	uv run --frozen python tests/chaos/chaos.py

reset:
	uv run --frozen medledger reset
