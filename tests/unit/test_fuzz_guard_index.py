"""A bounded run of the guard-index fuzzer (fuzz/fuzz_guard_index.py; `make fuzz` runs a longer one).

The fuzzer runs in a subprocess: atheris takes over the process and ends it with exit(), and the
guard-name target imports ComfyUI. PYTHONHASHSEED is fixed so that the random engine's run (and the
coverage it reaches) is the same each time.
"""
import os
import re
import subprocess
import sys
import types

import pytest
from test_fuzz_set_loader import atheris_installed

from nudging_core import embedding_set, guard_index, index_guard, memorization

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = {"guard_index": guard_index, "index_guard": index_guard, "memorization": memorization,
           "embedding_set": embedding_set, "node": None}


@pytest.mark.parametrize("engine", [
    pytest.param("atheris", marks=pytest.mark.skipif(not atheris_installed(), reason="atheris is not installed")),
    "random",
])
def test_fifteen_hundred_hostile_guard_folders_and_names_open_or_are_refused(tmp_path, engine):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    run = subprocess.run([sys.executable, "-m", "fuzz.fuzz_guard_index", "--runs", "1500", "--engine", engine,
                          "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = run.stdout[run.stdout.find("engine:"):]
    assert "cases: 1500" in summary, run.stdout + run.stderr[-3000:]
    assert run.returncode == 0 and "failures: 0" in summary, summary
    tally = dict((k, int(v)) for k, v in re.findall(r"([a-z][a-z ()]*[a-z)]): (\d+)", summary.splitlines()[0]))
    assert tally["opened"] > 100 and tally["refused"] > 300 and tally["flagged"] > 50, summary
    assert tally["names resolved"] > 10 and tally["names refused"] > 100, summary   # ComfyUI is the test host
    reached, lines = map(int, re.search(r"coverage: (\d+)/(\d+) lines of guard_index.py's reading", summary).groups())
    assert reached >= 0.85 * lines, summary
    reached, lines = map(int, re.search(r"(\d+)/(\d+) of LoadGuardIndex's by-name path", summary).groups())
    assert reached >= 0.85 * lines, summary


def test_the_harness_records_a_raw_exception_with_its_input(tmp_path):
    from fuzz import fuzz_guard_index as fuzz

    def broken_cache(keep):
        return types.SimpleNamespace(get=lambda folder, label, opener: {}["count"])

    harness = fuzz.GuardHarness(dict(MODULES, index_guard=types.SimpleNamespace(
        OpenedIndexes=broken_cache, IndexGuard=index_guard.IndexGuard)), str(tmp_path / "out"), str(tmp_path))
    hostile = fuzz.encode_folder(0, [(fuzz.FILE, "guard.json", b"{}")])
    assert not harness.check(hostile)
    saved = sorted((tmp_path / "out" / "failures").iterdir())
    assert [p.suffix for p in saved] == [".bin", ".txt"]
    assert saved[0].read_bytes() == hostile and "KeyError" in saved[1].read_text()
    harness = fuzz.GuardHarness(MODULES, str(tmp_path / "out2"), str(tmp_path / "again"))
    assert harness.check(hostile)                       # refused by the real opener, naming guard.json
    assert harness.check(b"\1../escape")                # no ComfyUI here: counted, not run
    assert harness.tally["refused"] == 1 and harness.tally["names not run (no ComfyUI)"] == 1


def test_a_folder_input_round_trips_and_keeps_its_target():
    import random

    from fuzz import fuzz_guard_index as fuzz

    entries = [(fuzz.FILE, "guard.json", b"{}"), (fuzz.LINK, "shard_00000.safetensors", b"../outside"),
               (fuzz.SPARSE, "x\udcff", b"\0\4\0\0abc")]
    assert fuzz.decode_folder(fuzz.encode_folder(300, entries)[1:]) == (44, entries)
    rng = random.Random(3)
    assert all(fuzz.mutate(fuzz.encode_folder(0, entries), rng)[0] in (0, 1, 2) for _ in range(200))


def test_a_case_that_spins_is_recorded_as_a_hang(tmp_path, monkeypatch):
    from fuzz import fuzz_set_loader

    class Spinning(fuzz_set_loader.Recorder):
        def outcome(self, data):
            while True:
                pass

    monkeypatch.setattr(fuzz_set_loader, "HANG_SECONDS", 0.2)
    recorder = Spinning(str(tmp_path), ())
    assert not recorder.check(b"\0spin")
    assert list(recorder.causes) == ["Hang at test_fuzz_guard_index.py:_: over _._ s of CPU time on one input"]
