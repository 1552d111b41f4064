"""`python -m attnkit ...` (also `accelerate launch -m attnkit ...`) runs the CLI."""

from attnkit.cli import main

main()
