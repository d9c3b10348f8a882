"""One module per CLI subcommand. Each defines `register(subparsers)` and sets `run=callable(args) -> int`."""
