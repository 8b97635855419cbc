# One command each: `make demo` sets up and runs the offline demo; `make test` runs the tests;
# `make repro` runs `dvc repro` with this project's .venv first on PATH (dvc.yaml calls `copal`).
.PHONY: setup demo test repro

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/copal run

test: setup
	.venv/bin/python -m pytest -q

repro: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro
