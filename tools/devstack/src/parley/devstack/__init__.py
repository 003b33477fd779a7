"""A complete local Parley stack in one foreground process: Postgres, Redis and both services."""
