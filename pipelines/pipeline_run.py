"""The parent MLflow run of one pipeline invocation (`make demo` / `scripts/demo.sh` around `dvc repro`).

DVC runs every stage as its own process and has no hook around a whole `dvc repro`, so the wrapper opens the
parent run, exports its id as $EDTALK_PARENT_RUN_ID, and closes it with the outcome; every stage run and the
evaluation run started in between carry `mlflow.parentRunId` and show nested under it in the MLflow UI:

    export EDTALK_PARENT_RUN_ID=$(python -m pipelines.pipeline_run start --name "dvc repro")
    dvc repro ...; python -m pipelines.pipeline_run end "$EDTALK_PARENT_RUN_ID" FINISHED   # or FAILED

A stage that DVC skips (nothing changed) starts no run, so it shows under the invocation that last ran it.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import lineage
from preprocessing.params import load_section


def start(name: str, params_path: str = "params.yaml", targets: str = "") -> str:
    """A new run in the training experiment (train.experiment), source-tagged; returns its id."""
    uri = lineage.tracking_uri()
    exp_id = lineage.experiment_id(
        str(load_section(params_path, "train", ()).get("experiment", "edtalk")), uri
    )
    git = lineage.git_info(".")
    tags = {"stage": "pipeline", "dvc.targets": targets, **git, **lineage.source_tags(name, git)}
    run = lineage.client(uri).create_run(exp_id, run_name=name, tags=tags)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.pipeline_run", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="open the parent run; prints its id")
    p_start.add_argument("--name", default="dvc repro")
    p_start.add_argument("--params", default="params.yaml")
    p_start.add_argument("--targets", default="", help="the dvc repro targets (a tag of the run)")
    p_end = sub.add_parser("end", help="close the parent run")
    p_end.add_argument("run_id")
    p_end.add_argument("status", choices=["FINISHED", "FAILED", "KILLED"])
    args = parser.parse_args(argv)
    if args.command == "start":
        print(start(args.name, args.params, args.targets))
    else:
        lineage.end_run(args.run_id, lineage.tracking_uri(), status=args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
