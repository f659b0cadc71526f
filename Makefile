# Postwarden: `make run` and `make test` are the whole set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-soak bench-events bench-audience bench-import bench-campaign bench-tracking bench-analytics bench-bounces clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

## Start the appliance on embedded defaults, delivering into the built-in lab.
run: $(STAMP)
	$(BIN)/postwarden lab

## Run the whole test suite: most of it in parallel (TEST_WORKERS pytest-xdist workers,
## at the lowest CPU priority), and alongside it, at normal priority, the timing-sensitive
## tests (marked serial: rates measured at an MX, group commit), SERIAL_WORKERS at a
## time. The kernel gives the serial tests a core whenever they want one, so they run as
## on a quiet machine while the rest fills what they leave; their output follows the
## rest's. Exit 5 of the serial run only means that none were selected.
## Byte-code first, and kept: the suite starts hundreds of interpreters (pytest's
## workers, the appliance's, CLI calls), and where PYTHONDONTWRITEBYTECODE is set each
## would compile the sources (0.5 s) and rewrite the test modules' asserts again.
TEST_WORKERS ?= 6
SERIAL_WORKERS ?= 3
TEST_ENV := env -u PYTHONDONTWRITEBYTECODE PATH="$$PATH:/usr/sbin:/sbin"
# The files that mark tests serial (the mark is written in the test file): the serial
# run collects these alone, unless PYTEST_ARGS names what to run.
SERIAL_FILES = $(shell grep -rlE --include='test_*.py' 'mark\.serial' tests | sort)
# pytest rewrites each test module's asserts at its first import and caches the result
# beside it: on a fresh checkout every worker, starting at once, would do it again (4 s
# of CPU each). One collection first, whenever a test file changed, does it once.
REWRITTEN := $(VENV)/.tests-rewritten
$(REWRITTEN): $(STAMP) $(shell find tests -name '*.py')
	$(TEST_ENV) $(BIN)/python -m pytest --collect-only -q -p no:xdist -p no:cacheprovider \
		>/dev/null 2>&1 && touch $@ || true  # a collection error: the run below shows it
test: $(STAMP) $(REWRITTEN)
	$(BIN)/python -m compileall -q src tests bench >/dev/null
	@log=$$(mktemp); \
	$(TEST_ENV) $(BIN)/python -m pytest -n $(SERIAL_WORKERS) --dist worksteal -m serial \
		$(PYTEST_ARGS) $(if $(PYTEST_ARGS),,$(SERIAL_FILES)) >"$$log" 2>&1 & serial=$$!; \
	trap 'kill $$serial 2>/dev/null; rm -f "$$log"; exit 130' INT TERM; \
	$(TEST_ENV) nice -n 19 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal \
		-m "not serial" $(PYTEST_ARGS); rest=$$?; \
	wait $$serial; ser=$$?; [ $$ser -eq 5 ] && ser=0; \
	echo "== the tests marked serial (run alongside, at normal priority) =="; \
	cat "$$log"; rm -f "$$log"; \
	[ $$rest -eq 0 ] && [ $$ser -eq 0 ]

## Style, types, and the import contracts of docs/architecture.md (.importlinter).
lint: $(STAMP)
	$(BIN)/ruff check src tests bench dashboards
	$(BIN)/ruff format --check src tests bench dashboards
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(PROFILE),--profile $(PROFILE),) $(if $(REPS),--reps $(REPS),)

clean:
	rm -rf $(VENV) var build *.egg-info

## An hour-shaped load scaled down: 15 minutes at 1M messages/hour through Postwarden.
bench-soak: $(STAMP)
	$(BIN)/python bench/soak.py $(if $(MINUTES),--minutes $(MINUTES),)

## GET /v1/events over 1M events of one tenant, on a private PostgreSQL (not in `bench`).
bench-events: $(STAMP)
	$(BIN)/python bench/events_query.py

## Audience counts over 1M contacts on a private PostgreSQL and 100k on SQLite (not in `bench`).
bench-audience: $(STAMP)
	$(BIN)/python bench/audience_count.py

## A contact import of 1M rows (and 100k) on SQLite and a private PostgreSQL: rows/s
## and peak RSS (not in `bench`).
bench-import: $(STAMP)
	$(BIN)/python bench/import_contacts.py

## A campaign to 1M contacts through `postwarden serve` on a private PostgreSQL into the
## lab's sinks: launch time, first delivery, e2e rate against the SMTP bench's in the
## same run, render throughput per core, peak PSS (not in `bench`). MEASURE=0 waits for
## every delivery (hours on 2 cores); MAX_SECONDS bounds the measured part (3600).
bench-campaign: $(STAMP)
	$(BIN)/python bench/campaign.py $(if $(CONTACTS),--contacts $(CONTACTS),) $(if $(MEASURE),--measure $(MEASURE),) \
		$(if $(MAX_SECONDS),--max-seconds $(MAX_SECONDS),) $(if $(DB),--db $(DB),)

## The tracking pixel and redirect (each hit stored, group commit) against a static 204
## of the same app and process, under wrk: requests/s, ratios, CPU (not in `bench`).
## DB=sqlite|postgresql|both (sqlite); PY_SPY=SECONDS profiles the server afterwards.
bench-tracking: $(STAMP)
	$(BIN)/python bench/tracking.py $(if $(DB),--db $(DB),) $(if $(REPS),--reps $(REPS),) \
		$(if $(PY_SPY),--py-spy $(PY_SPY),)

## Analytics over a 1M-recipient campaign and a month of mail on a private PostgreSQL:
## the rollup rate and each route's p50/p95 against issue 23's targets (not in `bench`).
bench-analytics: $(STAMP)
	$(BIN)/python bench/analytics.py $(if $(RECIPIENTS),--recipients $(RECIPIENTS),) \
		$(if $(REPS),--reps $(REPS),)

## The bounce classifier on the dev corpus: in-sample and leave-one-family-out (LOFO)
## figures side by side, per reason and per family (docs/bounces.md, "Measuring
## generalization"; not in `bench`). IN_SAMPLE=1: in-sample only; STRICT=1: LOFO where
## source tags keep no rule.
bench-bounces: $(STAMP)
	$(BIN)/python bench/bounce_lofo.py $(if $(IN_SAMPLE),--in-sample,) $(if $(STRICT),--strict,)
