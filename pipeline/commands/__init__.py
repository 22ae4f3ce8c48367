"""The subcommands, one module each: its `HELP`, `add_arguments(parser)` and `cmd_*(args)`.

A command module imports only light modules at its top (the parser is built from all of them);
what a command runs with is imported when it runs. No command imports another: what several share
lives below them (`pipeline.options`, `pipeline.inference`, `pipeline.budget`, ...).
"""
