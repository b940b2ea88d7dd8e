"""Which preview files a node may delete: those of its own older runs, inside the temp folder only.

ComfyUI writes every preview (ui.PreviewImage) as a new file in its temp folder and empties that
folder only at startup, so a node that previews on every run fills it on a long-running server.
This keeps, per node id, the files of the last few runs that wrote any, and hands back the rest.
No ComfyUI imports: the node passes in what ui.PreviewImage returned and the temp folder.
"""
from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict, deque

PreviewFile = tuple[str, str]   # (subfolder, filename) inside the temp folder
# ConditionalRegenerate's window: the canvas shows the latest run; the queue panel's recent entries
# still open. At most 64 x 8 runs of previews are kept however often graphs change.
PREVIEW_RUNS_KEPT = 8
PREVIEW_NODES_KEPT = 64


class PreviewRetention:
    """The temp files of each node id's last `runs_per_node` preview-writing runs; at most `max_nodes`
    node ids are remembered (least recently run dropped first), so the files kept stay bounded even
    when graphs and their node ids keep changing."""

    def __init__(self, runs_per_node: int, max_nodes: int):
        if runs_per_node < 1 or max_nodes < 1:
            raise ValueError("runs_per_node and max_nodes must be at least 1")
        self.runs_per_node = runs_per_node
        self.max_nodes = max_nodes
        self._runs: OrderedDict[str, deque[list[PreviewFile]]] = OrderedDict()
        self._lock = threading.Lock()   # ComfyUI runs one prompt at a time; the lock costs nothing

    def record(self, node_id, results) -> list[PreviewFile]:
        """Remember one run's previews (ui.PreviewImage's results: dicts with filename, subfolder and
        type); returns the files that fell out of the window. Only type 'temp' entries are tracked."""
        files = [(str(r.get("subfolder") or ""), str(r["filename"])) for r in results
                 if isinstance(r, dict) and r.get("type") == "temp" and r.get("filename")]
        if not files:
            return []   # a run that previewed nothing does not push older previews out
        key = str(node_id if node_id is not None else "")
        dropped: list[PreviewFile] = []
        with self._lock:
            runs = self._runs.pop(key, None) or deque()
            runs.append(files)
            while len(runs) > self.runs_per_node:
                dropped += runs.popleft()
            self._runs[key] = runs   # re-inserted: now the most recently run node id
            while len(self._runs) > self.max_nodes:
                _old_key, old_runs = self._runs.popitem(last=False)
                for run in old_runs:
                    dropped += run
        return dropped

    def tracked(self) -> list[PreviewFile]:
        """Every file still remembered (oldest node id first)."""
        with self._lock:
            return [f for runs in self._runs.values() for run in runs for f in run]

    def keep(self, node_id, results, temp_dir: str) -> list[str]:
        """record(), then delete what fell out of the window; returns the paths deleted."""
        return remove_temp_files(temp_dir, self.record(node_id, results))


def temp_file_path(temp_dir: str, subfolder: str, filename: str) -> str | None:
    """The file's path when it lies inside temp_dir (links resolved for its folder), else None."""
    if not filename or os.path.basename(filename) != filename or filename in (".", ".."):
        return None
    root = os.path.realpath(temp_dir)
    folder = os.path.realpath(os.path.join(root, subfolder))
    if os.path.commonpath([root, folder]) != root:
        return None
    return os.path.join(folder, filename)


def remove_temp_files(temp_dir: str, files: list[PreviewFile]) -> list[str]:
    """Delete the given files when they are plain files inside temp_dir; a link, a folder or anything
    outside is left alone, a missing file is skipped. Never raises: a failed clean-up must not fail
    the prompt that triggered it."""
    removed = []
    for subfolder, filename in files:
        path = temp_file_path(temp_dir, subfolder, filename)
        if path is None:
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.remove(path)
            removed.append(path)
        except OSError:
            continue
    return removed
