VENV ?= .venv
WHEELHOUSE ?= $(HOME)/.cache/mmvit3/wheels
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmvit3-setup-done
PYTEST_ARGS ?=
# pytest-xdist workers; a test file's tests stay on one worker (its
# module fixtures are built once).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV) $(WHEELHOUSE)
	touch $@

# Idle OpenMP threads that spin make the multi-process tests (and any run on
# a shared CPU) several times slower; passive waiting costs nothing here.
export OMP_WAIT_POLICY ?= PASSIVE

# The whole suite, end-to-end tool runs included.
test: setup
	$(PYTEST) $(PYTEST_ARGS)

# Unit tests only (skips the end-to-end tool runs marked slow).
test-fast: setup
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

demo: setup
	bash tools/demo.sh $(PY)

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
