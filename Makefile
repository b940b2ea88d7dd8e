# The two commands a newcomer runs: `make demo` and `make test`. Each does its own set-up.
PY := .cache/venv/bin/python
CKPT ?=

.PHONY: host demo test test-unit test-integration screenshots bench workflows clean shapes-eval

host:
	bash host/setup_host.sh

demo: host
	$(PY) -m demo.run_demo $(if $(CKPT),--checkpoint "$(CKPT)")

test: host-0.30
	$(TEST_ON_0.30) tests

test-unit: host-0.30
	$(TEST_ON_0.30) tests/unit

test-integration: host-0.30
	$(TEST_ON_0.30) tests/integration

workflows: host
	$(PY) -m tools.make_workflows

clean:
	rm -rf out .cache/test-homes

bench: host
	$(PY) -m bench.run_bench

# Coverage-guided fuzzing (issue #14) of the embedding-set loader (fuzz/fuzz_set_loader.py: every
# hostile set file or set name must load to a consistent set or be refused with NudgeInputError), then
# of the guard index (fuzz/fuzz_guard_index.py: every hostile guard folder must open to an index whose
# check gives a well-formed verdict, or be refused with NudgeInputError; every guard name must resolve
# inside the embedding_sets folders or be refused by LoadGuardIndex). Each prints cases, coverage and
# failures; failing inputs and their tracebacks land in out/fuzz/failures and out/fuzz-guard/failures,
# the corpora grow in out/fuzz/corpus and out/fuzz-guard/corpus. Uses atheris (requirements-dev.txt)
# where it is installed, a seeded mutator elsewhere. About two minutes for the default 20000 cases of
# each; FUZZ_RUNS=200000 or FUZZ_ARGS="--seconds 600" for longer runs. Both run even when one fails.
FUZZ_RUNS ?= 20000
.PHONY: fuzz
fuzz: host
	$(PY) -m fuzz.fuzz_set_loader --runs $(FUZZ_RUNS) --out out/fuzz $(FUZZ_ARGS); status=$$?; \
	$(PY) -m fuzz.fuzz_guard_index --runs $(FUZZ_RUNS) --out out/fuzz-guard $(FUZZ_ARGS) && exit $$status

# What the memorization filter costs against guarded sets of growing size (512x512 items, exact
# tiled-L2 path) and how the comparison size changes its verdict on planted copies (issue #12).
# Prints tables; writes bench/filter_scale.json, bench/comparison_size.json, bench/scale.json and
# bench/build_throughput.json (building a guard index from image files, one process vs Ray Data).
SCALE_SIZES ?= 100 500 1000 2000
.PHONY: bench-scale
bench-scale: host
	$(PY) -m bench.comparison_size --json bench/comparison_size.json
	$(PY) -m bench.filter_scale --sizes $(SCALE_SIZES) --json bench/filter_scale.json
	$(PY) -m bench.scale_million --sizes $(MILLION_SIZES) --json bench/scale.json
	$(PY) -m bench.build_throughput --files 4000 --size 512 --num-cpus 2 --json bench/build_throughput.json

# The guard index (nudging_core/guard_index.py) at up to a million items: writes about 13 GB of
# shards under out/ while it runs (deleted after), about 5 minutes here. MILLION_SIZES=1000000 for the largest only.
MILLION_SIZES ?= 10000 100000 1000000

# Soak (issue #14): 300 queued prompts on one server (clean and memorized captions, both guard
# workflows, batches, interrupts); prints the server's memory growth after warm-up and any wrong status.
.PHONY: soak
soak: host
	$(PY) -m tools.soak --prompts 300 --json out/soak.json

# The shapes fixture's own targets (memorizes its duplicated items, generalizes elsewhere).
shapes-eval: host
	$(PY) -m shapes_world.evaluate --seeds 10

# Screenshots of the canvas UI (docs/screenshots/*.png) and the template-browser thumbnails
# (workflows/<name>.jpg), taken by the browser end-to-end test in the real frontend.
screenshots: host-0.30
	mkdir -p docs/screenshots
	NUDGING_SCREENSHOTS=$(CURDIR)/docs/screenshots NUDGING_THUMBNAILS=$(CURDIR)/workflows \
		NUDGE_HOST=0.30 $(PY_0.30) -m pytest -q -c tests/pytest.ini --rootdir=tests tests/integration/test_browser.py \
		tests/integration/test_browser_frontend.py

# The test-host matrix (see host/comfy_env.py). `make host` installs both; `make test` (and
# test-unit, test-integration) runs on the newest ComfyUI reachable offline, 0.30.0 with frontend
# 1.58.1; `make test-min` runs the suite on 0.3.75, the minimum the pack declares. The tests run
# in-process, so each host's suite runs in that host's own venv. demo, bench and the other
# targets use $(PY), the 0.3.75 host.
PY_0.30 := .cache/venv-0.30/bin/python
TEST_ON_0.30 := NUDGE_HOST=0.30 $(PY_0.30) -m pytest -q -c tests/pytest.ini --rootdir=tests
TEST_ON_MIN := NUDGE_HOST=0.3.75 $(PY) -m pytest -q -c tests/pytest.ini --rootdir=tests

.PHONY: host-0.30 host-min test-min test-browser-pinned

host-0.30:
	bash host/setup_host.sh 0.30

host-min:
	bash host/setup_host.sh 0.3.75

test-min: host-min
	$(TEST_ON_MIN) tests

# The browser suites on ComfyUI 0.30.0 with the frontend it pins (1.47.12) instead of 1.58.1: each
# backend is also tested with its own frontend (0.3.75's 1.32.9 runs in test-min).
test-browser-pinned: host-0.30
	NUDGE_HOST=0.30-pinned $(PY_0.30) -m pytest -q -c tests/pytest.ini --rootdir=tests \
		tests/integration/test_browser.py tests/integration/test_browser_frontend.py
