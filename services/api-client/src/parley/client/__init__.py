"""The Parley Python SDK and the `parley` command line."""
