"""The one way `edtalk` commands start or join Ray.

With RAY_ADDRESS set, Ray joins that cluster and its operators decide what listens where. Without it the command
starts a Ray instance of its own on this machine, and that instance listens on loopback only: the GCS, the
raylet, the object manager, the workers and the agents all bind 127.0.0.1, so nothing on the network can submit
work to it or read its objects. The dashboard (an HTTP server that accepts jobs) does not start unless asked with
EDTALK_RAY_DASHBOARD=1, and then it binds 127.0.0.1 as well. The workers' temporary files go into one scratch
folder that the command removes when it ends, killed or not (a SIGKILLed command's, by the next command).

Ray picks a local node's address with `ray._private.services.get_node_ip_address`, which returns the loopback
address when `ray_constants.ENABLE_RAY_CLUSTER` is false (its setting on macOS and Windows, read from
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported). `ray.init(_node_ip_address="127.0.0.1")` does not do it:
Ray turns a loopback address into the machine's outward one. So the local start sets that switch, for this process
and its children; tests/test_security_ray.py lists the listening sockets of a run to hold Ray to it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

SCRATCH_PREFIX = "edtalk-ray-"  # TMPDIR of a local instance's workers: tempdir/edtalk-ray-PID-XXXX
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's local node uses the loopback address
DASHBOARD_ENV = "EDTALK_RAY_DASHBOARD"  # "1": start the (loopback) dashboard with a local instance


def init(**kwargs) -> bool:
    """ray.init unless Ray is already up: the cluster at RAY_ADDRESS, else a loopback-only local instance.

    kwargs go to ray.init (runtime_env, log_to_driver, num_cpus, ...). Returns True when this call started or
    joined Ray, False when it was already initialised (a caller's own instance, e.g. a test fixture's)."""
    import ray

    if ray.is_initialized():
        return False
    if not os.environ.get("RAY_ADDRESS"):
        _loopback_only()
        kwargs.setdefault("include_dashboard", os.environ.get(DASHBOARD_ENV) == "1")
        kwargs["runtime_env"] = _with_scratch(kwargs.get("runtime_env"))
    ray.init(**kwargs)
    return True


def _with_scratch(runtime_env: dict | None) -> dict:
    """The workers' temporary files go into one folder of this command (their TMPDIR), removed when it ends by an
    error, Ctrl-C or SIGTERM: a worker Ray kills cannot clean up after itself. A folder left by a command that was
    SIGKILLed is removed by the next one."""
    for stale in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = stale.name[len(SCRATCH_PREFIX) :].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    atexit.register(_end, scratch)
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "TMPDIR": scratch}
    return env


def _end(scratch: str) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the workers first: they write into the scratch folder
    shutil.rmtree(scratch, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _loopback_only() -> None:
    from ray._private import ray_constants

    os.environ[LOOPBACK_SWITCH] = "0"  # the children Ray starts read it when they import Ray
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray before the variable was set
