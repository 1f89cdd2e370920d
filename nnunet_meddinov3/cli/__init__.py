"""The ``meddinov3`` command line: one module per subcommand, each exposing
``add_arguments(parser)`` and ``run(args) -> int``."""
