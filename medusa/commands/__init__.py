"""CLI subcommands. Each module defines `register(subparsers)`, which adds its parser and sets
`func` to a function of the parsed args returning an exit code."""
