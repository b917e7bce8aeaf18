# The README's two commands: `make demo` (the main job) and `make test`.
.PHONY: demo test lint unit bench bootstrap clean

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/llmops demo

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy

unit: bootstrap
	.venv/bin/pytest -q

test: lint unit

bench: bootstrap
	.venv/bin/python bench/agent_overhead.py

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
