test:
	bash scripts/install.sh && .venv/bin/python -m pytest -q tests

lint:
	.venv/bin/ruff check thinkrl tests scripts && .venv/bin/ruff format --check thinkrl tests scripts

.PHONY: test lint
