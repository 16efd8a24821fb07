"""Version checks for the few places that touch a library's private internals.

A private attribute can change in any release. Where the package reads or patches one, it first calls `require`,
so that a newer library fails with one message naming it, instead of deep inside the library.
"""
from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version


def require(distribution: str, spec: str, what: str) -> None:
    """Raise RuntimeError unless installed `distribution` satisfies `spec`; `what` names the code needing it.

    First used, through load_model's GGUF conversion, in notebook 01.
    """
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"{what} needs {distribution} {spec}, which is not installed. "
                           "Run `make setup` (it installs the versions in constraints.txt).") from None
    if Version(installed) not in SpecifierSet(spec):
        raise RuntimeError(
            f"{what} reads internals of {distribution} that were written for {distribution} {spec}, and this "
            f"environment has {distribution} {installed}. Install the tested version with `make setup` "
            "(constraints.txt), or update this code for the new release."
        )
