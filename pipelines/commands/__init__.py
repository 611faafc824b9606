"""One module per `edtalk` subcommand (see pipelines/cli.py COMMANDS)."""
