"""The command-line stages: one module per `prepare.py` subcommand, in pipeline order.

Each module has NAME (the subcommand), HELP (its line in `prepare.py --help`),
add_arguments(parser) and main(args) -> exit status; its docstring says what it writes.
prepare.py lists them. Shared options live in `options`; library code in osmseg/ holds no
argparse. `report` is the end of `make demo` (python -m osmseg.commands.report).
"""
