# `make demo` trains PAPO on the embedded demo; `make test` runs the test suite.
# Both first build (or reuse) the pinned CPU environment: see scripts/bootstrap.sh.
.PHONY: demo test bootstrap clean-venv

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

clean-venv:
	rm -rf .venv
