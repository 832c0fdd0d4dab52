"""The ``dynoai`` command line: one module per subcommand (cantools-style)."""
