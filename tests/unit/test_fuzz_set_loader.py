"""A bounded run of the set-loader fuzzer (fuzz/fuzz_set_loader.py; `make fuzz` runs a longer one).

The fuzzer runs in a subprocess: atheris takes over the process and ends it with exit().
"""
import os
import subprocess
import sys
import types

import pytest

from nudging_core import embedding_set as sets
from nudging_core.errors import NudgeInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def atheris_installed() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("engine", [
    pytest.param("atheris", marks=pytest.mark.skipif(not atheris_installed(), reason="atheris is not installed")),
    "random",
])
def test_two_thousand_hostile_inputs_load_or_are_refused(tmp_path, engine):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "fuzz.fuzz_set_loader", "--runs", "2000", "--engine", engine,
                          "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = run.stdout[run.stdout.find("engine:"):]
    assert "cases: 2000" in summary, run.stdout + run.stderr[-3000:]
    assert run.returncode == 0 and "failures: 0" in summary, summary


def test_the_harness_records_a_raw_exception_with_its_input(tmp_path):
    from fuzz import fuzz_set_loader as fuzz

    broken = types.SimpleNamespace(NudgeInputError=NudgeInputError, resolve_set_path=sets.resolve_set_path,
                                   load_set=lambda path: {}["latents"])
    harness = fuzz.Harness(broken, str(tmp_path / "out"), str(tmp_path))
    assert not harness.check(b"\0not a set")
    assert harness.check(b"\1../escape.safetensors")        # refused by the real resolve_set_path
    saved = sorted((tmp_path / "out" / "failures").iterdir())
    assert [p.suffix for p in saved] == [".bin", ".txt"]
    assert saved[0].read_bytes() == b"\0not a set" and "KeyError" in saved[1].read_text()
    assert harness.tally["failures"] == 1 and harness.tally["names refused"] == 1
