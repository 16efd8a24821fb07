"""Version checks for the few places that read or patch a library's private internals, which any release may change."""
from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version


def require(distribution: str, spec: str, what: str) -> None:
    """Raise RuntimeError naming `what` unless `distribution` satisfies `spec` (through load_model, notebook 01)."""
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or Version(installed) not in SpecifierSet(spec):
        raise RuntimeError(f"{what} reads internals of {distribution} that were written for {distribution} {spec}, "
                           f"and this environment has {distribution} {installed or '(not installed)'}. Install the "
                           "tested version with `make setup` (constraints.txt), or update this code for a new release.")
