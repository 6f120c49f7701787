# The two commands of the README: `make all-tables` (the main job) and `make test`.
# Both create .venv and install what is missing first (scripts/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
REPRODUCE := $(VENV)/bin/reproduce

.PHONY: setup all-tables test test-slow dry-run diff lint clean

setup:
	@bash scripts/setup_env.sh

all-tables: setup  ## every registered table at this machine's scale (cached: a second run is quick)
	$(REPRODUCE) all-tables
	$(REPRODUCE) diff --all
	$(REPRODUCE) report

test: setup  ## the test suite (slow and GPU tests are skipped with their reason)
	$(PY) -m pytest -q

# The slow tests use TEST_THREADS torch threads each (tests/helpers.py; 1 in `make test`, which shares
# its cores): CI runs them as their own step, alone on the machine (docs/architecture.md, Testing).
TEST_THREADS ?= 2
test-slow: setup  ## the slow tests (full-depth equivalence of the largest models, every official layout, every timm check on every model)
	TEST_THREADS=$(TEST_THREADS) $(PY) -m pytest -q --runslow -m slow --durations=15

dry-run: setup  ## every recipe at full size: models, teachers, optimizer, one step (CI; ~11 min on 2 cores)
	$(REPRODUCE) dry-run --all

diff: setup  ## committed results against the references, with params and MACs measured again
	$(REPRODUCE) diff --all --remeasure

clean:
	rm -rf .cache runs
