"""ConditionalRegenerate's preview bookkeeping: which temp files go, and that nothing else is touched."""
import os

import pytest

from nudging_core.preview_retention import PreviewRetention, remove_temp_files, temp_file_path


def run(name, n=2, subfolder=""):
    return [{"filename": f"{name}_{i}.png", "subfolder": subfolder, "type": "temp"} for i in range(n)]


def test_only_the_last_runs_per_node_are_kept():
    keep = PreviewRetention(runs_per_node=2, max_nodes=8)
    assert keep.record("11", run("a")) == []
    assert keep.record("11", run("b")) == []
    assert keep.record("7", run("x")) == []            # another node has its own window
    assert keep.record("11", run("c")) == [("", "a_0.png"), ("", "a_1.png")]
    assert keep.record("11", []) == []                 # a run without previews pushes nothing out
    assert sorted(f for _s, f in keep.tracked()) == ["b_0.png", "b_1.png", "c_0.png", "c_1.png", "x_0.png", "x_1.png"]


def test_least_recently_run_node_is_forgotten_with_its_files():
    keep = PreviewRetention(runs_per_node=4, max_nodes=2)
    keep.record("1", run("one", 1))
    keep.record("2", run("two", 1))
    keep.record("1", run("one-again", 1))                    # "2" is now the least recently run
    assert keep.record("3", run("three", 1)) == [("", "two_0.png")]


def test_only_temp_results_are_tracked():
    keep = PreviewRetention(runs_per_node=1, max_nodes=1)
    keep.record("1", [{"filename": "saved.png", "subfolder": "", "type": "output"},
                      {"filename": "in.png", "subfolder": "", "type": "input"}, "junk", {"type": "temp"}])
    assert keep.tracked() == []


def test_keep_deletes_fallen_out_files_and_tolerates_missing_ones(tmp_path):
    keep = PreviewRetention(runs_per_node=1, max_nodes=4)
    for name in ("a_0.png", "a_1.png", "b_0.png", "b_1.png"):
        (tmp_path / name).write_bytes(b"png")
    keep.keep("11", run("a"), str(tmp_path))
    (tmp_path / "a_1.png").unlink()                          # someone cleaned up already
    removed = keep.keep("11", run("b"), str(tmp_path))
    assert removed == [str(tmp_path / "a_0.png")]
    assert sorted(os.listdir(tmp_path)) == ["b_0.png", "b_1.png"]


def test_nothing_outside_the_temp_folder_or_not_a_plain_file_is_removed(tmp_path):
    temp, outside = tmp_path / "temp", tmp_path / "outside"
    temp.mkdir(), outside.mkdir()
    (outside / "precious.png").write_bytes(b"keep me")
    (temp / "sub").mkdir()
    (temp / "escape").symlink_to(outside, target_is_directory=True)
    (temp / "link.png").symlink_to(outside / "precious.png")
    (temp / "folder.png").mkdir()
    files = [("..", "outside/precious.png"), ("../outside", "precious.png"), ("/", str(outside / "precious.png")),
             ("escape", "precious.png"), ("", "link.png"), ("", "folder.png"), ("", ".."), ("", "")]
    assert remove_temp_files(str(temp), files) == []
    assert (outside / "precious.png").read_bytes() == b"keep me"
    assert (temp / "link.png").is_symlink() and (temp / "folder.png").is_dir()
    (temp / "sub" / "p.png").write_bytes(b"png")
    assert remove_temp_files(str(temp), [("sub", "p.png")]) == [str(temp / "sub" / "p.png")]


@pytest.mark.parametrize("subfolder, filename", [("", "a/b.png"), ("x/../..", "a.png"), ("", "../a.png")])
def test_paths_that_leave_the_folder_are_refused(tmp_path, subfolder, filename):
    assert temp_file_path(str(tmp_path), subfolder, filename) is None


def test_window_must_hold_a_run():
    with pytest.raises(ValueError):
        PreviewRetention(runs_per_node=0, max_nodes=1)
