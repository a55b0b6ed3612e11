"""The ``gsva-ros`` command-line tools (each subcommand lives in its own module)."""
