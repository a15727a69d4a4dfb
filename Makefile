# `make demo` trains PAPO on the embedded demo; `make test` runs the test suite.
# Both first build (or reuse) the pinned CPU environment: see scripts/bootstrap.sh.
.PHONY: demo test lint format bootstrap clean-venv

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PYTEST_ARGS ?=

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/papo train

test: bootstrap
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: bootstrap
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .

format: bootstrap
	.venv/bin/python -m ruff check --fix .
	.venv/bin/python -m ruff format .

clean-venv:
	rm -rf .venv
