"""A real ComfyUI server in a throwaway home folder, driven over its HTTP API.

Used by the integration tests, the demo and the bench. The pack is linked into the home's
custom_nodes, so the server loads it exactly as a user's install would.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

from host.comfy_env import CACHE, REPO, Host, selected_host  # noqa: F401 (CACHE: re-exported)

HOST = selected_host()  # NUDGE_HOST: which ComfyUI tree, venv and frontend (see comfy_env.py)
COMFY_DIR = HOST.comfy_dir
PACK_NAME = "comfyui-embedding-nudging"


class HostError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    def __init__(self, home: str, port: int | None = None, extra_args: list[str] | None = None,
                 host: Host | None = None):
        self.host = host or HOST
        self.home = os.path.abspath(home)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(self.home, "server.log")

    # --- folders -------------------------------------------------------------------------
    def dir(self, *parts: str) -> str:
        path = os.path.join(self.home, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/checkpoints", "models/embedding_sets", "input", "output", "user", "temp"):
            self.dir(sub)
        link = os.path.join(self.home, "custom_nodes", PACK_NAME)
        if not os.path.lexists(link):
            os.symlink(REPO, link)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyHost":
        host = self.host
        for path in (os.path.join(host.comfy_dir, "main.py"), host.python,
                     host.front_end_root and os.path.join(host.front_end_root, "index.html")):
            if path and not os.path.isfile(path):
                raise HostError(f"ComfyUI {host.version} host incomplete, {path} is missing: "
                                f"run `bash host/setup_host.sh {host.name}` first")
        self.prepare()
        # The server runs in the host's own venv, whatever Python drives it.
        cmd = [host.python, os.path.join(REPO, "host", "launcher.py"), host.comfy_dir, "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.home,
               "--database-url", f"sqlite:///{os.path.join(self.home, 'user', 'comfyui.db')}",
               "--disable-auto-launch"]
        if host.front_end_root and "--front-end-root" not in self.extra_args:
            cmd += ["--front-end-root", host.front_end_root]
        cmd += self.extra_args
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise HostError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    # --- HTTP ----------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; a graph the server rejects raises HostError with its node_errors."""
        try:
            answer = self.request("POST", "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as err:
            raise HostError(f"server rejected the prompt ({err.code}): {err.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            time.sleep(0.2)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.request("POST", "/interrupt", {})


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a finished history entry, if it failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def node_ui(entry: dict, prompt: dict, class_type: str) -> dict | None:
    """The ui output of the (first executed) node of class_type in a finished history entry."""
    for nid, node in prompt.items():
        if node["class_type"] == class_type and nid in entry.get("outputs", {}):
            return entry["outputs"][nid]
    return None


def node_ui_json(entry: dict, prompt: dict, class_type: str, key: str) -> dict | None:
    """A JSON payload a pack node put in its ui output under `key`."""
    out = node_ui(entry, prompt, class_type)
    values = (out or {}).get(key)
    return json.loads(values[0]) if values else None


def output_paths(host: "ComfyHost", entry: dict, prompt: dict, class_type: str, kind: str = "output") -> list[str]:
    """Files a node wrote ('output' for SaveImage, 'temp' for previews), as paths on disk."""
    out = node_ui(entry, prompt, class_type) or {}
    return [os.path.join(host.home, kind, item.get("subfolder", ""), item["filename"])
            for item in out.get("images", []) if item.get("type") == kind]


def execution_seconds(entry: dict) -> float | None:
    """Server-side time from execution_start to execution_success (no HTTP polling in it)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        return None
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
