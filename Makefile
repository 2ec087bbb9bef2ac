# The two commands a new user needs: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The Snowflake emulator (fakesnow) needs SQLAlchemy 2.0 and connector 4.x: its own venv.
SNOWFLAKE_BIN := .venv-snowflake/bin
# The lowest Dagster pyproject.toml allows (constraints/dagster-lowest.txt): its own venv, for
# the tests that touch Dagster's API, so the range's floor is tested and not only the newest.
LOWEST_BIN := .venv-dagster-lowest/bin
DAGSTER_TESTS := $(addprefix klaviyo_pipelines_tests/,test_build_defs.py test_dagster.py \
	test_component.py test_pool.py)
DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: demo test test-snowflake test-dagster-lowest ui lint bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo's instance (no "No dagster instance configuration file" warning), written once;
# readable by you only: it keeps run logs and rejected rows, personal data among them.
$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME) && chmod 700 $(DAGSTER_HOME)
	install -m 600 scripts/dagster_demo.yaml $@

demo: $(BIN)/.installed $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/klaviyo-pipelines demo

$(SNOWFLAKE_BIN)/.installed: pyproject.toml constraints/snowflake.txt
	test -x $(SNOWFLAKE_BIN)/python || $(PYTHON) -m venv .venv-snowflake
	$(SNOWFLAKE_BIN)/python -m pip install --quiet --upgrade pip
	$(SNOWFLAKE_BIN)/python -m pip install --quiet -e '.[dev,snowflake]' 'fakesnow[server]' \
		-c constraints/snowflake.txt
	touch $@

$(LOWEST_BIN)/.installed: pyproject.toml constraints/dagster-lowest.txt
	test -x $(LOWEST_BIN)/python || $(PYTHON) -m venv .venv-dagster-lowest
	$(LOWEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LOWEST_BIN)/python -m pip install --quiet -e '.[dev]' -c constraints/dagster-lowest.txt
	touch $@

# The three venvs install side by side first: all three took 2 min 38 s on a 2-core machine
# where the first alone took 2 min 20 s (pip waits on downloads as much as on the CPU).
# Then the main suite runs on two workers (pytest-xdist): it mostly waits on servers,
# subprocesses and the sandbox, so two halve its wall time on a 2-core machine (17 -> 9 min).
test:
	$(MAKE) -j3 $(BIN)/.installed $(SNOWFLAKE_BIN)/.installed $(LOWEST_BIN)/.installed
	$(MAKE) test-snowflake
	$(MAKE) test-dagster-lowest
	env -u DAGSTER_HOME $(BIN)/pytest -n 2 -m "not snowflake"

test-snowflake: $(SNOWFLAKE_BIN)/.installed
	env -u DAGSTER_HOME $(SNOWFLAKE_BIN)/pytest -m snowflake

test-dagster-lowest: $(LOWEST_BIN)/.installed
	env -u DAGSTER_HOME $(LOWEST_BIN)/pytest -m "not snowflake" $(DAGSTER_TESTS)

ui: $(BIN)/.installed $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) PATH=$(CURDIR)/$(BIN):$$PATH scripts/ui.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python bench/change_set.py --all
	$(BIN)/python bench/noop_sync.py
	$(BIN)/python bench/delivery.py
	$(BIN)/python bench/client_cpu.py
	$(BIN)/python bench/first_sync_memory.py --rows 100000 1000000
	$(BIN)/python bench/verify.py
