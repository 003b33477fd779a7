"""Checks of Parley's deployment files (see conftest.py); a package, so that its test modules
import the helpers beside them (`from .helm import render`)."""
