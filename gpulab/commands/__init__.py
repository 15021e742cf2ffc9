"""`gpulab` subcommands that live in their own modules (see gpulab.cli.COMMAND_MODULES): each
module has `register(subparsers)`, which adds its parser and sets `func`."""
