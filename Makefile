# One command each: `make demo` sets up and runs the offline demo; `make test` runs the tests.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/copal run

test: setup
	.venv/bin/python -m pytest -q
