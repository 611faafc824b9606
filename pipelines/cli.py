"""The `edtalk` command line.

Subcommands live in their own modules and are imported only when invoked, so `edtalk --help` stays fast and a
subcommand's heavy dependencies (Ray, DeepSpeed, transformers) load only when that subcommand runs.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click.Command. Each owner adds its own line.
COMMANDS: dict[str, str] = {
    "preprocess": "pipelines.commands.preprocess:preprocess",
    "synth": "pipelines.commands.synth:synth",
    "train": "pipelines.commands.train:train",
    "evaluate": "pipelines.commands.evaluate:evaluate",
    "generate": "pipelines.commands.generate:generate",
    "import": "pipelines.commands.import_cmd:import_checkpoint",
    "serve": "pipelines.commands.serve:serve",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are resolved from COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module_name, attr = COMMANDS[cmd_name].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    return None  # declared but not built yet
                raise
            return getattr(module, attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edtalk-pipeline")
def cli() -> None:
    """EDTalk / EDTalk++ pipeline: preprocess videos, train every stage, evaluate, generate talking heads."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
