# `make run` and `make test` each create the virtualenv they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test torture bench install systemd-check clean

# PYTHONWARNINGS: setuptools warns about every editable install (~10 lines); the quick
# start stays quiet.
$(BIN)/kmagent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps py-KISSmetrics==1.1.0  # for the compat differential
	touch $@

run: $(BIN)/kmagent  ## the agent, in the foreground, on the default SQLite spool
	$(BIN)/kmagent run

test: $(BIN)/kmagent  ## the whole test suite (4 workers: it mostly waits on processes)
	$(BIN)/pytest -q -n 4

# The torture suite at length (tests/torture/; `make test` runs its short mode):
# make torture SEED=123 SECONDS=120 [BACKEND=sqlite|jsonl|both] [PATTERNS=a,b] [FAULTS=x,y|none]
SECONDS ?= 120
BACKEND ?= both
torture: $(BIN)/kmagent  ## apps, faults and operators at once for SECONDS, then the oracle
	$(BIN)/python tests/torture --seconds $(SECONDS) --backend $(BACKEND) \
		$(if $(SEED),--seed $(SEED)) $(if $(PATTERNS),--patterns $(PATTERNS)) \
		$(if $(FAULTS),--faults $(FAULTS))

PEERS := bench/.venv-peers/bin/python

# The peers live in their own venv: py-KISSmetrics needs urllib3 < 2, kmagent 2.x.
$(PEERS):
	$(PYTHON) -m venv bench/.venv-peers
	bench/.venv-peers/bin/pip install --quiet segment-analytics-python persist-queue py-kissmetrics

bench: $(BIN)/kmagent $(PEERS)  ## every benchmark; rewrites bench/RESULTS.md
	$(BIN)/python bench/run.py

# A system install: kmagent in its own venv (Debian's Python refuses system-wide pip
# installs), the command linked into $(PREFIX)/bin, the unit and snippets in place.
PREFIX ?= /usr/local
OPT ?= /opt/kmagent
DESTDIR ?=
SYSTEMD_UNIT_DIR ?= /etc/systemd/system

install:
	$(PYTHON) -m venv $(DESTDIR)$(OPT)
	$(DESTDIR)$(OPT)/bin/pip install --quiet .
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(OPT)/bin/kmagent $(DESTDIR)$(PREFIX)/bin/kmagent
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR) $(DESTDIR)/usr/lib/sysusers.d $(DESTDIR)/usr/lib/tmpfiles.d
	sed 's#/usr/local/bin/kmagent#$(PREFIX)/bin/kmagent#' systemd/kmagent.service \
		> $(DESTDIR)$(SYSTEMD_UNIT_DIR)/kmagent.service
	install -m 644 systemd/kmagent.sysusers.conf $(DESTDIR)/usr/lib/sysusers.d/kmagent.conf
	install -m 644 systemd/kmagent.tmpfiles.conf $(DESTDIR)/usr/lib/tmpfiles.d/kmagent.conf
	install -d -m 755 $(DESTDIR)/etc/kmagent
	test -e $(DESTDIR)/etc/kmagent/config.toml || \
		sed -e 's#^api_key = .*#api_key_file = "/run/credentials/kmagent.service/api_key"#' \
		    -e 's#^\# api_key_file = .*##' config.example.toml > $(DESTDIR)/etc/kmagent/config.toml

# Real systemd, by hand and as root (not part of `make test`): boots Debian 12 in
# systemd-nspawn, installs kmagent as README says and checks the unit. --head: HEAD only.
systemd-check:
	bash tests/real_systemd/check.sh $(CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
