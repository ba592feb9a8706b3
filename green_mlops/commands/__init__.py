"""The ``green-mlops`` commands that turn finished runs into decisions: one module each.

Each module has ``register(subparsers)``: it adds its parser and sets ``run`` (``args -> exit
code``) as the parser's default; :data:`green_mlops.cli.COMMANDS` lists them. The commands only
present: the computing lives in the core modules they call.
"""
