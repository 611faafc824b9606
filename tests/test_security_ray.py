"""A local Ray started by an `edtalk` command listens on loopback only, and its processes end with the command.

Issue 23 item 3: without RAY_ADDRESS, `edtalk preprocess` / `edtalk train` start a Ray instance of their own; its
GCS, raylet, workers and agents used to listen on every interface (`::`), so anyone on the network could reach them.
"""

from __future__ import annotations

import ast
import glob
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
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


def _scratch(before: set[str]) -> set[str]:
    """edtalk-* folders in the temp folder (and one level down: a worker's TMPDIR) that were not in `before`."""
    tmp = tempfile.gettempdir()
    return (
        set(glob.glob(os.path.join(tmp, "edtalk-*")) + glob.glob(os.path.join(tmp, "edtalk-*", "edtalk-*")))
        - before
    )


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
    loopback; SIGTERM ends the command and every process it started, and leaves no edtalk-* temporary folder."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "clip.mp4").symlink_to(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pipelines.cli", "preprocess", "--input", str(raw), "--output"]
    cmd += [str(tmp_path / "out"), "--no-progress", "--set", "preprocess.landmark_backend=dlib"]
    before = _scratch(set())
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        parent = psutil.Process(proc.pid)
        deadline, children = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            if any("pre-" in os.path.basename(d) for d in _scratch(before)):
                break  # Ray is up and a worker is processing the video (its edtalk-pre-* scratch folder exists)
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
        assert not _scratch(before), f"the killed command left {_scratch(before)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_get_the_callers_env_and_a_scratch_folder_removed_at_exit():
    """local_ray.init keeps the caller's runtime_env variables (the training runner passes its own) and gives the
    workers a TMPDIR of this command, gone once the process exits."""
    code = (
        "import os, tempfile, ray; from preprocessing import local_ray\n"
        "local_ray.init(num_cpus=1, runtime_env={'env_vars': {'EDTALK_PROBE': 'kept'}})\n"
        "f = ray.remote(lambda: (os.environ.get('EDTALK_PROBE'), tempfile.gettempdir()))\n"
        "probe, tmp = ray.get(f.remote()); print(probe, tmp, os.path.isdir(tmp))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    probe, tmp, existed = res.stdout.split()[-3:]
    assert res.returncode == 0 and probe == "kept" and existed == "True", res.stdout + res.stderr[-2000:]
    assert os.path.basename(tmp).startswith("edtalk-ray-") and not os.path.exists(tmp)
