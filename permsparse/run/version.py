"""The version of permsparse that runs: the one its checkout's ``pyproject.toml`` names, else the installed
distribution's. A checkout run with ``PYTHONPATH`` (as on a lent GPU machine) is not installed, so the
distribution's metadata alone would not know it."""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def package_version() -> str:
    """``[project] version`` of the ``pyproject.toml`` beside the package (a checkout), else the installed
    distribution's version, else ``"unknown"``."""
    if PYPROJECT.is_file():
        project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", PYPROJECT.read_text(), re.M | re.S)
        found = project and re.search(r'^name\s*=\s*"permsparse"\s*$', project.group(1), re.M) and re.search(
            r'^version\s*=\s*"([^"]+)"\s*$', project.group(1), re.M)
        if found:
            return found.group(1)
    try:
        return version("permsparse")
    except PackageNotFoundError:
        return "unknown"
