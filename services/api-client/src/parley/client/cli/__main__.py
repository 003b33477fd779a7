"""`python -m parley.client.cli`: the same as the `parley` command."""

from parley.client.cli import main

main()
