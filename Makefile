# The two commands a newcomer runs: `make demo` and `make test`. Each does its own set-up.
PY := .cache/venv/bin/python
CKPT ?=

.PHONY: host demo test test-unit test-integration screenshots bench workflows clean

host:
	bash host/setup_host.sh

demo: host
	$(PY) -m demo.run_demo $(if $(CKPT),--checkpoint "$(CKPT)")

test: host
	$(PY) -m pytest -q -c tests/pytest.ini --rootdir=tests tests

test-unit: host
	$(PY) -m pytest -q -c tests/pytest.ini --rootdir=tests tests/unit

test-integration: host
	$(PY) -m pytest -q -c tests/pytest.ini --rootdir=tests tests/integration

workflows: host
	$(PY) -m tools.make_workflows

clean:
	rm -rf out .cache/test-homes

bench: host
	$(PY) -m bench.run_bench
