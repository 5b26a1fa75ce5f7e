# medledger: the one entry point. `up`, `demo`, `test` and `bench` run `setup` first, so each
# works alone on a fresh machine.
.PHONY: setup up demo test lint bench reset

setup:
	@bash tools/setup.sh

up: setup
	uv run --frozen medledger up

# Until the platform issue brings `medledger demo`, the demo is a smoke run of the stack: start
# `medledger up` on free ports, see five SERVING health checks and the APIs by reflection, stop it.
demo: setup
	uv run --frozen pytest -q tests/integration/test_up.py

test: setup
	@bash tools/run_tests.sh

lint: setup
	uv run --frozen ruff check .
	uv run --frozen ruff format --check .
	uv run --frozen mypy libs/common/src libs/sdk/src services/*/src
	cd protos && ../tools/npm/node_modules/.bin/buf lint

bench: setup
	uv run --frozen python bench/run.py

reset:
	uv run --frozen medledger reset
