# The README's two commands: `make demo` (the main job) and `make test`.
.PHONY: demo test lint unit soak bench bootstrap test-bootstrap clean

bootstrap:
	./scripts/bootstrap.sh

test-bootstrap:
	WITH_TEST_TOOLS=1 ./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/llmops demo

lint: test-bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy

unit: test-bootstrap
	.venv/bin/pytest -q -m "not soak"

# 2,000 simulated agents at 1 s for 10 minutes against one controller (LLMOPS_SOAK_S shortens
# it); its figures go to bench/results/soak.json.
soak: test-bootstrap
	.venv/bin/pytest -q -m soak tests/faults/test_load.py

test: lint unit soak

bench: bootstrap
	.venv/bin/python bench/agent_overhead.py
	.venv/bin/python bench/nab.py
	.venv/bin/python bench/ingest.py
	.venv/bin/python bench/deploy.py
	.venv/bin/python bench/autoscale.py
	.venv/bin/python bench/injection.py
	.venv/bin/python bench/gateway.py

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
