"""The tools the deploy checks run, and what happens when one is missing.

They need Helm 3 and Helm 4 (HELM3 and HELM4, by default the ones `make helm-tools` puts in
.tools/), and hadolint, check-jsonschema and kubernetes-validate from the dev dependencies.
Under `make deploy-check` (PARLEY_DEPLOY_CHECKS=required) and in CI (CI=true) a missing tool
fails the check; run by hand elsewhere, its checks are skipped and the reason is printed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tools_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("PARLEY_DEPLOY_CHECKS") == "required"


def missing_tool(message: str) -> None:
    """Fails under make and in CI; skips with the reason when run by hand."""
    if tools_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    """A console script of the dev dependencies, next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        found = shutil.which(name)
        if found is None:
            missing_tool(f"{name} is not installed: run `make sync` (it is a dev dependency)")
        assert found is not None
        return found
    return str(path)
