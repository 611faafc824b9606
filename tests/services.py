"""Loopback services for the @pytest.mark.services tests: an S3 server (moto), PostgreSQL, an MLflow server with
basic auth on both, and a two-node Ray cluster. Loaded as a pytest plugin by tests/conftest.py.

Every service is a real server process started here in its own process group (start_new_session=True) and ended
by signalling that group, so nothing else on the machine is touched (never `ray stop`, never `pkill`). Session
scoped: a test run pays each start-up once, and only when a test asks for the service.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, ray, dvc, moto_server live beside python
INSTALL_HINT = "run `sudo infra/ci/install-services.sh` (Debian/Ubuntu: apt-get install -y postgresql)"


# --------------------------------------------------------------------------------------------- process helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick: always inside its ephemeral range)."""
    return free_ports(1)[0]


def free_ports(k: int) -> list[int]:
    """k distinct TCP ports free on 127.0.0.1 right now: all held open together while the kernel picks them, so
    no two are the same (k separate free_port() calls may return one port twice)."""
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range, first and last (the ports bind(0) hands out)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_RANGES: set[int] = set()  # bases of the port ranges free_port_range has handed out and not yet had back


def free_port_range(n: int) -> int:
    """The first of n consecutive free loopback ports (Ray wants worker port ranges): outside the kernel's
    ephemeral range, so that no port a process binds to 0 (every free_port(), Ray's own "random" ports) can
    ever fall inside it; above Ray's default worker range (10002-19999, which a plain local ray.init() in the
    same session uses); and overlapping no range handed out before and not released (release_port_range)."""
    rng = secrets.SystemRandom()
    eph_low, eph_high = _ephemeral_range()
    # Where a range of n fits: between Ray's default worker range and the ephemeral range, else above the latter.
    spans = [(lo, hi) for lo, hi in ((20000, eph_low - n), (eph_high + 1, 65536 - n)) if hi > lo]
    if not spans:
        raise RuntimeError(f"no room for {n} ports outside the ephemeral range {eph_low}-{eph_high}")
    for _ in range(200):
        base = rng.randrange(*rng.choice(spans))
        if any(abs(base - other) < n for other in _RANGES):
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _RANGES.add(base)
        return base
    raise RuntimeError(f"no range of {n} free ports found on 127.0.0.1 in {spans} (first ports)")


def release_port_range(base: int) -> None:
    _RANGES.discard(base)


@dataclass
class Proc:
    """A server process leading its own process group, with its log file."""

    name: str  # what it is, for messages
    popen: subprocess.Popen  # the group leader
    log: Path  # stdout+stderr
    # What asks it to shut down cleanly (PostgreSQL: SIGINT, its "fast" shutdown).
    stop_signal: int = signal.SIGTERM

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.popen.returncode}; log {self.log}:\n{self.tail()}"
            )

    def stop(self, grace: float = 15.0) -> None:
        """Signal the whole group, wait, then SIGKILL what is left of the group."""
        pgid = self.popen.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, self.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        # The leader may be gone while children of the group linger: kill the group unconditionally.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def start(
    name: str, cmd: list[str], log: Path, env: dict | None = None, stop_signal: int = signal.SIGTERM, **kw
) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(
        cmd,
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        **kw,
    )
    fh.close()
    return Proc(name, popen, log, stop_signal)


def wait_until(ok: Callable[[], bool], timeout: float, proc: Proc, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            if ok():
                return
        except Exception:  # not up yet: connection refused, 5xx during start-up, ...
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"{proc.name}: {what} not reached within {timeout:.0f} s; log {proc.log}:\n{proc.tail()}"
    )


def kill_leftovers(sessions: set[int], marker: str) -> None:
    """SIGKILL what escaped our process groups: Ray's raylet puts each worker in a group of its own (but in our
    session), and renames it `ray::IDLE`. Matched by our session ids or our unique temp dir in the command line,
    so nobody else's processes are touched."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            pid = p.info["pid"]
            if pid == me:
                continue
            if os.getsid(pid) in sessions or any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue


# --------------------------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    """moto's S3-compatible server on loopback."""

    port: int  # loopback TCP port
    proc: Proc  # the server process
    access_key: str = "edtalk-test-key"  # moto accepts any credentials; real ones keep the SDKs happy
    secret_key: str = "edtalk-test-secret"
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment every S3 client here reads: pyarrow (storage.py), boto3, DVC, MLflow."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start("moto S3 server", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        server = S3Server(port, proc)
        wait_until(
            lambda: urllib.request.urlopen(server.endpoint, timeout=2).status == 200, 60, proc, "HTTP 200"
        )
        yield server
    finally:
        proc.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The S3 server's settings in os.environ for this test (and fresh storage.py filesystems)."""
    from preprocessing import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.clear_cache()
    yield s3_server
    storage.clear_cache()


# --------------------------------------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path:
    """The bin dir of the newest PostgreSQL under /usr/lib/postgresql (Debian layout), else initdb on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name or 0)
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}")


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback, password authentication over TCP."""

    port: int  # loopback TCP port
    user: str  # superuser name
    password: str  # its password (scram-sha-256)
    proc: Proc  # the postmaster

    def url(self, database: str) -> str:
        """libpq URL (psycopg2.connect)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def sqlalchemy_url(self, database: str) -> str:
        """SQLAlchemy URL (MLflow stores); SQLAlchemy 2.1 defaults `postgresql://` to psycopg 3, not installed."""
        return self.url(database).replace("postgresql://", "postgresql+psycopg2://", 1)

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.url("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.sqlalchemy_url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    import psycopg2

    pg_bin = find_pg_bin()
    # initdb refuses to run as root: run the server as the `postgres` system user the package creates. The data
    # lives under /tmp directly, since pytest's own tmp dirs (mode 0700, root) are closed to that user.
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"running as root and no `postgres` user exists to run PostgreSQL as: {INSTALL_HINT}")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="edtalk-pg-"))
    password = secrets.token_hex(12)
    (base / "pw").write_text(password)
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
        os.chown(base / "pw", owner.pw_uid, owner.pw_gid)
    os.chmod(base / "pw", 0o600)
    proc = None
    try:
        init = subprocess.run(
            [*as_user, str(pg_bin / "initdb"), "-D", str(base / "data"), "-U", "edtalk", "--pwfile", str(base / "pw"),
             "--auth-host=scram-sha-256", "--auth-local=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if init.returncode != 0:
            pytest.fail(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        port = free_port()
        log = base / "postgres.log"
        log.touch()
        if owner is not None:
            os.chown(log, owner.pw_uid, owner.pw_gid)
        proc = start(
            "PostgreSQL",
            # Durability is irrelevant for a throwaway test database: skip the fsyncs.
            [*as_user, str(pg_bin / "postgres"), "-D", str(base / "data"), "-p", str(port), "-h", "127.0.0.1",
             "-k", str(base), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            log,
            stop_signal=signal.SIGINT,  # "fast" shutdown; SIGTERM would wait for clients to disconnect
        )  # fmt: skip
        server = PostgresServer(port, "edtalk", password, proc)
        wait_until(lambda: psycopg2.connect(server.url("postgres")).close() is None, 60, proc, "a connection")
        yield server
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------- MLflow server


@dataclass
class MlflowServer:
    """`mlflow server --app-name basic-auth`: PostgreSQL backend store and auth store, artifacts proxied to S3."""

    uri: str  # MLFLOW_TRACKING_URI
    admin_user: str  # the bootstrap admin
    admin_password: str
    bucket: str  # the S3 bucket holding the artifacts
    artifacts_prefix: str  # key prefix inside it
    proc: Proc

    def client_env(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        """What a client (a training job, a Ray worker) needs: no S3 credentials, the server proxies artifacts."""
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": user or self.admin_user,
            "MLFLOW_TRACKING_PASSWORD": password or self.admin_password,
        }


@pytest.fixture(scope="session")
def mlflow_server(s3_server, postgres_server, tmp_path_factory) -> Iterator[MlflowServer]:
    work = tmp_path_factory.mktemp("mlflow-server")
    bucket = s3_server.create_bucket("mlflow-artifacts")
    backend = postgres_server.create_database("mlflow")
    auth_db = postgres_server.create_database("mlflow_auth")
    admin_password = secrets.token_urlsafe(18)
    port = free_port()
    # The same start script as the Kubernetes Deployment (infra/k8s/mlflow/mlflow.yaml), loopback values.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        **s3_server.env(),
        "MLFLOW_BACKEND_STORE_URI": backend,
        "MLFLOW_AUTH_DATABASE_URI": auth_db,
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_AUTH_CONFIG_DIR": str(work),
        "MLFLOW_BIN": str(BIN / "mlflow"),
    }
    cmd = ["bash", str(REPO_ROOT / "infra" / "mlflow" / "start-mlflow.sh")]
    proc = start("MLflow server", cmd, work / "mlflow.log", env=env, cwd=work)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 180, proc, "/health"
        )
        yield MlflowServer(uri, "admin", admin_password, bucket, "artifacts", proc)
    finally:
        proc.stop(grace=8)


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET (no exception for 4xx/5xx)."""
    import base64

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --------------------------------------------------------------------------------------------- two-node Ray


@dataclass
class RayCluster:
    """A head and a worker node (raylets) on this host, 1 CPU each, told apart by custom resources."""

    address: str  # RAY_ADDRESS (GCS host:port)
    token: str  # RAY_AUTH_TOKEN: token authentication on, with a token of this cluster's own
    temp_dir: Path  # the cluster's own Ray temp dir (logs, sockets); also the marker of its processes
    procs: list[Proc] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Environment for a driver process that joins this cluster."""
        env = dict(os.environ)
        env.update(self.auth_env())
        env["RAY_ADDRESS"] = self.address
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def auth_env(self) -> dict[str, str]:
        # Explicit, because Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists (a plain local
        # ray.init() writes one) for some processes and not others; a token of our own also leaves that file alone.
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def run_driver(self, code: str, timeout: float = 120, extra_env: dict | None = None) -> dict:
        """Run Python code as a separate driver on the cluster; the code prints its result as one JSON line."""
        env = {**self.env(), **(extra_env or {})}
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"driver failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}\n"
                f"{self.raylet_log_tail()}"
            )
        # Workers' log lines reach the driver's stdout too, even after the result: take the last JSON line.
        for line in reversed(out.stdout.strip().splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
        raise RuntimeError(f"driver printed no JSON result:\n{out.stdout[-3000:]}")

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "worker": node id}, told apart by their custom resources."""
        return self.run_driver(
            "import json, ray; ray.init(); print(json.dumps({k.split('_')[0]: n['NodeID'] for n in ray.nodes() "
            "if n['Alive'] for k in n['Resources'] if k in ('head_node', 'worker_node')}))"
        )

    def raylet_log_tail(self, lines: int = 30) -> str:
        """The last lines of every raylet's log and error files (both nodes log under this cluster's temp dir):
        what a failing test shows, since the directory is removed when the cluster stops."""
        logs = self.temp_dir / "session_latest" / "logs"
        parts = []
        for f in sorted(logs.glob("raylet*.out")) + sorted(logs.glob("raylet*.err")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no raylet logs under {logs})"

    def workers_by_node(self) -> dict[str, set[str]]:
        """node id -> job ids that had a worker process on that node (from the raylets' own logs).

        Ray leases a worker to one job; its core-worker log names its node, its log file names the job. Needs no
        dashboard (the state API would; ray[default] is not installed)."""
        logs = self.temp_dir / "session_latest" / "logs"
        node_of: dict[str, str] = {}
        for f in logs.glob("python-core-worker-*.log"):
            m = re.search(r"worker_id=(\w+) node_id=(\w+)", f.read_text(errors="replace"))
            if m:
                node_of[m.group(1)] = m.group(2)
        out: dict[str, set[str]] = {}
        for f in logs.glob("worker-*-*-*.out"):
            _, worker_id, job_id, _ = f.name.split("-", 3)
            if worker_id in node_of and job_id != "ffffffff":
                out.setdefault(node_of[worker_id], set()).add(job_id)
        return out


WORKER_PORTS = 256  # per node (Ray's default range is ~10,000 ports)


def _ray_node_cmd(
    temp_dir: Path, head: bool, gcs_port: int, resources: dict, workers: int, cpus: int = 1
) -> list[str]:
    # Two raylets on one host need distinct ports for everything a node listens on. Every worker process holds
    # one port of its node's range (`workers`, from free_port_range) while it lives, and a raylet whose range is
    # used up fails worker starts ("No available ports"), which surfaces as "worker startup repeatedly failed": a
    # training job's actors, Ray Data tasks and the idle workers kept for reuse need more than a few dozen over a
    # session. The single ports come from the kernel's ephemeral range, which the worker ranges stay out of: Ray
    # refuses to start a node one of whose ports lies inside its worker range.
    # The GCS's port is not bound yet (the head binds it): keep clear of it.
    ports = [p for p in free_ports(8) if p != gcs_port][:7]
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics, dashboard = ports
    cmd = [
        str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
        "--object-store-memory", str(256 * 1024**2),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--min-worker-port", str(workers), "--max-worker-port", str(workers + WORKER_PORTS - 1),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
    ]  # fmt: skip
    if head:
        # --temp-dir (head only) keeps this cluster's address file out of /tmp/ray, so other engineers' plain
        # ray.init() never finds and joins it.
        cmd += ["--head", "--port", str(gcs_port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
                "--dashboard-port", str(dashboard)]  # fmt: skip
    else:
        cmd += ["--address", f"127.0.0.1:{gcs_port}"]
    return cmd


@contextlib.contextmanager
def local_ray_cluster(
    worker_node: bool = True, cpus: int = 1, extra_env: dict | None = None
) -> Iterator[RayCluster]:
    """A Ray head (resource `head_node`) and, optionally, a second node (`worker_node`) on this host, `cpus` CPUs
    each; everything stopped by process group on exit. Used by the ray_cluster fixture and bench/cluster.py."""
    temp_dir = Path(tempfile.mkdtemp(prefix="edtalk-ray-"))  # short: Ray's socket paths must stay < 108 chars
    gcs_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # no drain wait on SIGTERM: nothing to drain here
    env.update(extra_env or {})
    cluster = RayCluster(f"127.0.0.1:{gcs_port}", secrets.token_hex(32), temp_dir)
    env.update(cluster.auth_env())
    expected = ["head_node", "worker_node"] if worker_node else ["head_node"]
    ranges: list[int] = []
    try:
        ranges.append(free_port_range(WORKER_PORTS))
        head = start(
            "Ray head",
            _ray_node_cmd(temp_dir, True, gcs_port, {"head_node": 1}, ranges[-1], cpus),
            temp_dir / "head.out",
            env=env,
        )
        cluster.procs.append(head)
        wait_until(lambda: (temp_dir / "ray_current_cluster").exists(), 90, head, "head node up")
        if worker_node:
            ranges.append(free_port_range(WORKER_PORTS))
            worker = start(
                "Ray worker node",
                _ray_node_cmd(temp_dir, False, gcs_port, {"worker_node": 1}, ranges[-1], cpus),
                temp_dir / "worker.out",
                env=env,
            )
            cluster.procs.append(worker)
            wait_until(
                lambda: "Ray runtime started" in worker.log.read_text(errors="replace"),
                90,
                worker,
                "worker up",
            )
        nodes = cluster.run_driver(
            "import json, ray; ray.init(); "
            "print(json.dumps(sorted(k for n in ray.nodes() if n['Alive'] for k in n['Resources'] if k.endswith('_node'))))",
        )
        if nodes != expected:
            raise RuntimeError(f"the Ray cluster has nodes with resources {nodes}, expected {expected}")
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            proc.stop(grace=10)
        kill_leftovers({proc.popen.pid for proc in cluster.procs}, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        for base in ranges:
            release_port_range(base)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, mlflow_server) -> Iterator[RayCluster]:
    # Like the pods of infra/k8s/ray: every node holds the object-storage and MLflow client settings, so tasks read
    # s3:// and log runs from anywhere. 3 logical CPUs per node: a 2-CPU training rank fits only once per node, and
    # a whole CPU stays free on each for Ray Data's read tasks (1 CPU each; with less the ingest hangs).
    env = {**s3_server.env(), **mlflow_server.client_env()}
    with local_ray_cluster(cpus=3, extra_env=env) as cluster:
        yield cluster
