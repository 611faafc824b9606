"""A local Ray started by an `edtalk` command listens on loopback only, and its processes end with the command.

Issue 23 item 3: without RAY_ADDRESS, `edtalk preprocess` / `edtalk train` start a Ray instance of their own; its
GCS, raylet, workers and agents used to listen on every interface (`::`), so anyone on the network could reach them.
"""

from __future__ import annotations

import ast
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    found = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass  # a process that ended meanwhile
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_every_ray_init_goes_through_the_loopback_helper():
    """The project's code starts Ray in one place (preprocessing/local_ray.py), so no command can miss it."""
    calls = []
    for folder in ("edtalk", "pipelines", "preprocessing", "bench", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "local_ray.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                func = getattr(node, "func", None)
                owner = getattr(func, "value", None)
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "init"
                    and getattr(owner, "id", "") == "ray"
                ):
                    calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not calls, f"ray.init outside preprocessing/local_ray.py: {calls}"


@pytest.mark.slow
def test_preprocess_ray_listens_on_loopback_and_dies_with_the_command(tmp_path, media_dir):
    """`edtalk preprocess` without RAY_ADDRESS: every listening socket of the Ray processes it starts is on
    loopback; SIGTERM ends the command and every process it started."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "clip.mp4").symlink_to(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pipelines.cli", "preprocess", "--input", str(raw), "--output"]
    cmd += [str(tmp_path / "out"), "--no-progress", "--set", "preprocess.landmark_backend=dlib"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        parent = psutil.Process(proc.pid)
        deadline, children = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            if any("SourceProcessor" in p.name() for p in children if p.is_running()):
                break  # Ray is up and its workers run
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        children = parent.children(recursive=True)
        names = {p.name() for p in children}
        assert {"gcs_server", "raylet"} <= names, names
        sockets = _listening(children)
        assert sockets, "found no listening socket of the Ray processes"
        exposed = sorted(s for s in sockets if not _is_loopback(s[1]))
        assert not exposed, f"Ray processes listen beyond loopback: {exposed}"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes outlived the command: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
