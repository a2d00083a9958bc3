# The two commands of the README: `make run` (set up, then the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Telemetry would reach for the network, which these machines do not have.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test test-stack lint setup clean

setup: $(STAMP)

# constraints.txt pins every transitive version that was installed and tested together, so a fresh
# machine resolves nothing new (prefect 3.8 breaks at run time with newer fastapi / SQLAlchemy).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench,cluster,export]'
	touch $@

run: $(STAMP)
	$(BIN)/patchline nightly

test: $(STAMP)
	$(BIN)/python -m pytest

# The layer rules of ARCHITECTURE.md (import-linter contracts in pyproject.toml), on the checkout.
lint: $(STAMP)
	$(BIN)/lint-imports

# Needs Debian's postgresql (README, "Running on a cluster").
test-stack: $(STAMP)
	$(BIN)/python -m pytest -m stack

clean:
	rm -rf $(VENV) .patchline
