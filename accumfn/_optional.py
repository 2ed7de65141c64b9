"""Optional packages: one install hint for every integration that needs one."""

from __future__ import annotations

from typing import NoReturn

from .errors import MissingDependencyError

__all__ = ["install_hint", "raise_missing"]


def install_hint(package: str, extra: str, feature: str) -> str:
    """``"<feature> needs <package>, which is not installed: pip install 'accumfn[<extra>]'"``."""
    return f"{feature} needs {package}, which is not installed: pip install 'accumfn[{extra}]'"


def raise_missing(
    error: ImportError, package: str, extra: str, feature: str, otherwise: str = ""
) -> NoReturn:
    """Turn ``error`` into a ``MissingDependencyError`` if ``package`` itself is missing.

    Any other import failure (a package that is installed but broken, or a missing package
    of its own) is raised unchanged, since installing the extra would not fix it.
    """
    missing = (getattr(error, "name", None) or "").split(".")[0]
    if missing != package:
        raise error
    hint = install_hint(package, extra, feature)
    raise MissingDependencyError(f"{hint}{'; ' + otherwise if otherwise else ''}.") from error
