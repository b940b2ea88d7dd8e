# The two commands a newcomer runs: `make demo` and `make test`. Each does its own set-up.
PY := .cache/venv/bin/python
CKPT ?=

.PHONY: host demo test test-unit test-integration screenshots bench workflows clean shapes-eval

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

# The shapes fixture's own targets (memorizes its duplicated items, generalizes elsewhere).
shapes-eval: host
	$(PY) -m shapes_world.evaluate --seeds 10

# Screenshots of the canvas UI (docs/screenshots/*.png) and the template-browser thumbnails
# (workflows/<name>.jpg), taken by the browser end-to-end test in the real frontend.
screenshots: host
	mkdir -p docs/screenshots
	NUDGING_SCREENSHOTS=$(CURDIR)/docs/screenshots NUDGING_THUMBNAILS=$(CURDIR)/workflows \
		$(PY) -m pytest -q -c tests/pytest.ini --rootdir=tests tests/integration/test_browser.py
