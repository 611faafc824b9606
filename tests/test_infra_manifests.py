"""infra/: the manifests render with the one values file and parse; every `edtalk` command they run is valid for the
CLI's own parser; images, Ray versions and environments agree across them; the Dockerfile copies what exists and
installs the project the way the Makefile does. (No cluster or docker engine needed; fast.)"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _render_module():
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()
VALUES = render.load_values([INFRA / "values.env"])


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Template path (relative to infra/) -> its YAML documents, rendered with infra/values.env."""
    out = {}
    for rel, text in render.render_all(VALUES).items():
        assert "${" not in text, f"{rel}: a placeholder survived rendering"
        out[rel.as_posix()] = [d for d in yaml.safe_load_all(text) if d is not None]
    return out


RAY_KINDS = ("RayCluster", "RayJob", "RayService")
SERVE_ONLY_ENV = {"EDTALK_SERVE_TOKEN_FILE"}  # the RayService's replicas read the bearer token from this file


def ray_docs(rendered) -> list[tuple[str, dict]]:
    return [(f, d) for f, docs in rendered.items() for d in docs if d.get("kind") in RAY_KINDS]


def cluster_spec(doc: dict) -> dict:
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"] if key is None else doc["spec"][key]


def containers(spec: dict) -> list[tuple[str, dict]]:
    """(group name, container) of the head and every worker group of a RayCluster spec."""
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec.get("workerGroupSpecs", []):
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


# ------------------------------------------------------------------------------------------- rendering


def test_templates_exist_and_render(rendered):
    expected = {
        "k8s/ray/raycluster.yaml",
        "k8s/ray/rayjob-stage.yaml",
        "k8s/ray/rayjob-pipeline.yaml",
        "k8s/ray/rayjob-preprocess.yaml",
        "k8s/ray/rayservice-serve.yaml",
        "k8s/mlflow/postgres.yaml",
        "k8s/mlflow/mlflow.yaml",
        "ray/aws-cluster.yaml",
    }
    assert expected <= set(rendered)


def test_render_refuses_a_missing_value():
    values = dict(VALUES)
    del values["IMAGE_TAG"]
    with pytest.raises(render.RenderError, match="IMAGE_TAG"):
        render.render_all(values)
    # Shell ($NAME) and Kubernetes ($(NAME)) variables pass through untouched.
    assert render.render_text("a $HOME $(X) ${IMAGE_TAG}", VALUES) == f"a $HOME $(X) {VALUES['IMAGE_TAG']}"


def test_every_kubernetes_object_is_namespaced_and_named(rendered):
    for f, docs in rendered.items():
        if not f.startswith("k8s/"):
            continue
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d), (
                f"{f}: {d.get('kind')} lacks apiVersion/kind/metadata"
            )
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), (f, d["metadata"])
            assert d["metadata"]["namespace"] == VALUES["NAMESPACE"], (
                f"{f}: {d['kind']} not in the site namespace"
            )


# ------------------------------------------------------------------------------------------- Ray clusters


def test_ray_versions_agree():
    import ray

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    docker_default = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert VALUES["RAY_VERSION"] == docker_default == ray.__version__, (
        "infra/values.env RAY_VERSION, the Dockerfile's RAY_VERSION and the installed Ray must be one version "
        "(head, workers and drivers must match)"
    )


def test_ray_clusters_have_head_gpu_workers_and_autoscaling_bounds(rendered):
    docs = ray_docs(rendered)
    assert {d["kind"] for _, d in docs} == set(RAY_KINDS)
    for f, d in docs:
        spec = cluster_spec(d)
        assert spec["rayVersion"] == VALUES["RAY_VERSION"], f
        assert spec["enableInTreeAutoscaling"] is True, f"{f}: autoscaling off"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", (
            f"{f}: the head should schedule no work"
        )
        groups = spec["workerGroupSpecs"]
        assert groups, f"{f}: no worker group"
        for g in groups:
            lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
            assert all(isinstance(x, int) for x in (lo, n, hi)), (
                f"{f}/{g['groupName']}: replicas must be integers"
            )
            assert 0 <= lo <= n <= hi and hi >= 1, (
                f"{f}/{g['groupName']}: bounds {lo} <= {n} <= {hi} violated"
            )
    gpu_files = {
        f
        for f, d in docs
        if any(g["groupName"] == "gpu-workers" for g in cluster_spec(d)["workerGroupSpecs"])
    }
    assert {
        "k8s/ray/raycluster.yaml",
        "k8s/ray/rayjob-stage.yaml",
        "k8s/ray/rayjob-pipeline.yaml",
    } <= gpu_files
    # The single-stage job asks for TRAIN_WORKERS GPU ranks: the GPU group must be able to hold them.
    gpus = int(VALUES["GPU_WORKERS_MAX"]) * int(VALUES["GPU_PER_WORKER"])
    assert int(VALUES["TRAIN_WORKERS"]) <= gpus, "TRAIN_WORKERS exceeds GPU_WORKERS_MAX * GPU_PER_WORKER"


def test_images_and_environment_agree_across_manifests(rendered):
    base = f"{VALUES['IMAGE_REPO']}:{VALUES['IMAGE_TAG']}"
    envs = []
    for f, d in ray_docs(rendered):
        for group, c in containers(cluster_spec(d)):
            gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            assert c["image"] == f"{base}-{'cuda' if gpu else 'cpu'}", f"{f}/{group}: image {c['image']}"
            env = c["env"]
            if d["kind"] == "RayService":  # the shared environment plus the token file
                assert {e["name"] for e in env} >= SERVE_ONLY_ENV, f"{f}/{group}: no {SERVE_ONLY_ENV}"
                env = [e for e in env if e["name"] not in SERVE_ONLY_ENV]
            envs.append((f"{f}/{group}", env))
    first_name, first_env = envs[0]
    for name, env in envs[1:]:
        assert env == first_env, f"{name}: environment differs from {first_name}"
    names = {e["name"] for e in first_env}
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= names
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names

    (mlflow,) = [d for d in rendered["k8s/mlflow/mlflow.yaml"] if d["kind"] == "Deployment"]
    (server,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert server["image"] == f"{base}-cpu"

    aws = rendered["ray/aws-cluster.yaml"][0]
    assert aws["docker"]["image"] == f"{base}-cpu"
    assert aws["available_node_types"]["gpu-worker"]["docker"]["worker_image"] == f"{base}-cuda"


def test_aws_cluster_config_passes_rays_own_schema(rendered):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = rendered["ray/aws-cluster.yaml"][0]
    validate_config(prepare_config(config))  # what `ray up` does before touching AWS
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


def test_mlflow_deployment_provides_what_the_start_script_requires(rendered):
    script = (INFRA / "mlflow" / "start-mlflow.sh").read_text()
    required = set(re.search(r"for var in ([^;]+);", script).group(1).replace("\\", " ").split())
    (mlflow,) = [d for d in rendered["k8s/mlflow/mlflow.yaml"] if d["kind"] == "Deployment"]
    (server,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["bash", "infra/mlflow/start-mlflow.sh"]
    provided = {e["name"] for e in server["env"]}
    assert required and required <= provided, f"mlflow.yaml lacks {sorted(required - provided)}"
    assert "MLFLOW_S3_ENDPOINT_URL" in provided and "AWS_SECRET_ACCESS_KEY" in provided


def test_rayservice_runs_the_serve_app_with_valid_args(rendered):
    """serveConfigV2 names the app builder that exists, with args it accepts and overrides params.yaml knows; the
    token file the replicas are told about is where the Secret is mounted."""
    from ray.serve import Application

    from pipelines.serve.config import TOKEN_FILE_ENV
    from pipelines.serve.start import build

    (doc,) = rendered["k8s/ray/rayservice-serve.yaml"]
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is build and app["route_prefix"] == "/"
    check_set_overrides(app["args"]["set"], "rayservice serveConfigV2")
    assert app["args"]["model"] == VALUES["SERVE_MODEL"] and app["args"]["model"].startswith("models:/")
    args = {**app["args"], "params": str(REPO / app["args"]["params"])}
    assert isinstance(build(args), Application)  # binds only: the model loads in the replicas
    with pytest.raises(ValueError, match="model"):
        build({"params": args["params"]})
    for group, c in containers(cluster_spec(doc)):
        (token,) = [e["value"] for e in c["env"] if e["name"] == TOKEN_FILE_ENV]
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert any(token.startswith(m.rstrip("/") + "/") for m in mounts), f"{group}: {token} is not mounted"


# ------------------------------------------------------------------------------------------- commands


def simple_commands(command: str) -> list[list[str]]:
    """A shell command line -> its simple commands (split at &&, ||, ;, |), each as argv."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out, cur = [], []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        out.append(cur)
    return out


def params_sections() -> set[str]:
    return set(yaml.safe_load((REPO / "params.yaml").read_text()) or {})


def check_set_overrides(values: list[str], where: str) -> None:
    sections = params_sections()
    for v in values:
        key, sep, _ = v.partition("=")
        section = key.split(".", 1)[0]
        assert sep and "." in key, f"{where}: override {v!r} is not SECTION.KEY=VALUE"
        assert section in sections, f"{where}: override {v!r}: params.yaml has no section {section!r}"


def check_edtalk(argv: list[str], where: str) -> None:
    """Parse `edtalk ARGS` with the CLI's own click parser, resolving the lazy subcommand."""
    from pipelines.cli import cli

    args = argv[1:]
    try:
        ctx = cli.make_context("edtalk", list(args))
    except click.exceptions.Exit:
        return  # --help / --version
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    assert rest, f"{where}: `edtalk` without a subcommand"
    name, cmd, sub_args = (
        cli.resolve_command(ctx, rest) if rest[0] in cli.list_commands(ctx) else (rest[0], None, [])
    )
    if cmd is None:
        built = [n for n in cli.list_commands(ctx) if cli.get_command(ctx, n) is not None]
        pytest.fail(
            f"{where}: `edtalk {rest[0]}` is not a subcommand of the CLI (available: {', '.join(built)})"
        )
    try:
        sub = cmd.make_context(name, list(sub_args), parent=ctx)
    except click.UsageError as exc:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid invocation: {exc.format_message()}")
    check_set_overrides(list(sub.params.get("overrides", ())), where)


def manifest_commands(rendered) -> list[tuple[str, str]]:
    """(where, shell command line) of everything the manifests run."""
    out = []
    for f, docs in rendered.items():
        for d in docs:
            if d.get("kind") == "RayJob":
                out.append((f"{f} entrypoint", d["spec"]["entrypoint"]))
            pod = (d.get("spec", {}).get("template") or {}).get("spec", {})
            for c in pod.get("containers", []):
                if "command" in c:
                    out.append((f"{f} {c['name']}", shlex.join(c["command"] + c.get("args", []))))
            for key in ("initialization_commands", "head_start_ray_commands", "worker_start_ray_commands",
                        "setup_commands", "head_setup_commands", "worker_setup_commands"):  # fmt: skip
                out += [(f"{f} {key}", cmd) for cmd in d.get(key, []) or []]
    return out


def test_every_command_the_manifests_run_is_valid(rendered):
    commands = manifest_commands(rendered)
    edtalk_calls = 0
    for where, line in commands:
        for argv in simple_commands(line):
            if argv[0] == "edtalk":
                check_edtalk(argv, where)
                edtalk_calls += 1
            elif argv[0] in ("bash", "sh") and len(argv) > 1:
                script = REPO / argv[1]
                assert script.is_file(), f"{where}: runs {argv[1]}, which is not in the repository"
                assert script.stat().st_mode & 0o111, f"{where}: {argv[1]} is not executable"
                if script.name == "dvc-repro.sh":
                    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
                    check_set_overrides(sets, where)
    assert edtalk_calls >= 2, "the RayJobs should run edtalk commands (train, preprocess)"


def test_pipeline_stage_commands_are_valid_edtalk_invocations():
    """The pipeline RayJob runs dvc.yaml: its stage commands must parse too (once dvc.yaml exists)."""
    dvc_yaml = REPO / "dvc.yaml"
    if not dvc_yaml.exists():
        pytest.skip("no dvc.yaml yet")
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    for name, stage in stages.items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        for line in cmds:
            for argv in simple_commands(line):
                if argv[0] == "edtalk":
                    check_edtalk(argv, f"dvc.yaml stage {name}")


def test_checker_rejects_unknown_subcommands_and_bad_options():
    with pytest.raises(pytest.fail.Exception, match="not a subcommand"):
        check_edtalk(["edtalk", "deploy-everything"], "probe")
    with pytest.raises(pytest.fail.Exception, match="not a valid invocation"):
        check_edtalk(["edtalk", "preprocess", "--no-such-option"], "probe")
    with pytest.raises(AssertionError, match="no section"):
        check_set_overrides(["nosuchsection.key=1"], "probe")


def test_shell_splitting():
    assert simple_commands("cd $HOME && edtalk train x --set 'a.b=c d'; echo ok") == [
        ["cd", "$HOME"],
        ["edtalk", "train", "x", "--set", "a.b=c d"],
        ["echo", "ok"],
    ]


# ------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_and_is_not_ignored():
    ignore = [
        ln.strip()
        for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copies = [rest for op, rest in dockerfile_instructions() if op == "COPY"]
    assert copies
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            if src == ".":
                continue
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            hit = [p for p in ignore if fnmatch.fnmatch(src, p) or fnmatch.fnmatch(src, p.lstrip("*/"))]
            assert not hit, f"Dockerfile copies {src}, but the .dockerignore excludes it ({hit})"
    for needed in (
        "pyproject.toml",
        "requirements/constraints.txt",
        "params.yaml",
        "infra/mlflow/start-mlflow.sh",
    ):
        assert not any(fnmatch.fnmatch(needed, p) for p in ignore), (
            f"{needed} is excluded from the build context"
        )


def test_dockerfile_installs_like_the_makefile():
    make = (REPO / "Makefile").read_text()
    make_install = re.search(r"pip install (.*-c .*)", make).group(1).split()
    constraints = make_install[make_install.index("-c") + 1]
    runs = [rest for op, rest in dockerfile_instructions() if op == "RUN" and "pip install" in rest]
    assert len(runs) == 1, "one pip install of the project expected in the Dockerfile"
    tokens = runs[0].split()
    assert tokens[tokens.index("-c") + 1] == constraints, "the image must use the Makefile's constraints file"
    assert "-e" in make_install and "-e" in tokens, "both install the project in editable mode"
    project_spec = tokens[tokens.index("-e") + 1].strip("'\"")
    assert project_spec.startswith("."), f"the Dockerfile installs {project_spec!r}, not the project"


def test_dockerfile_variables_are_declared():
    ins = dockerfile_instructions()
    from_idx = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    assert len(from_idx) == 1
    before = {rest.split("=")[0] for op, rest in ins[: from_idx[0]] if op == "ARG"}
    used_in_from = set(re.findall(r"\$\{(\w+)\}", ins[from_idx[0]][1]))
    assert used_in_from <= before, f"FROM uses undeclared {used_in_from - before}"
    declared: set[str] = set()
    for op, rest in ins[from_idx[0] + 1 :]:
        if op == "ARG":
            declared.add(rest.split("=")[0])
        elif op == "ENV":
            declared |= {m for m in re.findall(r"(\w+)=", rest)}
        elif op == "RUN":
            used = set(re.findall(r"\$\{(\w+)\}", rest))
            assert used <= declared, (
                f"RUN uses {used - declared}, not declared (ARG before FROM is not in scope)"
            )
