"""The commands, files and extras that README.md and docs/ name still exist.

The Python blocks of the pages run under Sybil (conftest.py); shell lines do not, so this
checks what they name: each ``python -m MODULE`` is a module that runs as a script and takes
the options written after it, each ``accumfn SUBCOMMAND`` takes its options, each file of the
repository named exists, and each ``pip install`` extra is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from accumfn.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page.relative_to(ROOT).as_posix(): page.read_text(encoding="utf-8") for page in PAGES}

# A command runs to the end of its code span or line, or to a shell comment or `&&`.
MODULE_RUN = re.compile(r"python3? -m ([A-Za-z_][\w.]*)([^`\n#&]*)")
SUBCOMMAND = re.compile(r"\baccumfn (demo|plan|check)\b([^`\n#&:']*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
REPO_FILE = re.compile(r"\b((?:examples|tests|benchmarks|property_tests)/[\w/.-]+\.(?:py|yaml))\b")
EXTRAS = re.compile(r"(?:accumfn|\.)\[([\w,-]+)\]")


def _found(pattern: re.Pattern[str]) -> list[tuple[str, re.Match[str]]]:
    return [(page, match) for page, text in TEXT.items() for match in pattern.finditer(text)]


def _script_source(module: str) -> str | None:
    """The source that ``python -m module`` runs from this repository, else None."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__main__.py"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return None


def test_every_python_m_command_runs_a_module_that_takes_its_options() -> None:
    found = _found(MODULE_RUN)
    assert len(found) >= 8, "the pages name fewer commands than expected: is the pattern wrong?"
    for page, match in found:
        module, rest = match[1], match[2]
        source = _script_source(module)
        if source is None:  # pytest, venv: installed, not the repository's
            assert importlib.util.find_spec(module.split(".")[0]) is not None, (page, module)
            continue
        assert module.count(".") == 0 or '__name__ == "__main__"' in source, (page, module)
        package = _script_source(module.split(".")[0]) or ""
        for option in OPTION.findall(rest):
            assert f'"{option}"' in source + package, f"{page}: python -m {module} {option}"


def test_every_accumfn_subcommand_takes_its_options() -> None:
    parser = _parser()
    (subparsers,) = (a for a in parser._actions if a.choices and "plan" in a.choices)
    found = _found(SUBCOMMAND)
    assert {match[1] for _, match in found} == {"demo", "plan", "check"}
    named = [(page, match[1], match[2]) for page, match in found]
    demo = re.search(r"`accumfn demo --help`\): `([^`]*)`", TEXT["docs/quickstart.md"])
    assert demo is not None
    named.append(("docs/quickstart.md", "demo", demo[1]))  # the options listed after it
    for page, command, rest in named:
        options = {o for a in subparsers.choices[command]._actions for o in a.option_strings}
        for option in OPTION.findall(rest):
            assert option in options, f"{page}: accumfn {command} {option}"


def test_the_benchmark_options_the_pages_quote_exist() -> None:
    source = _script_source("benchmarks") or ""
    quoted = re.search(r"`(--only [^`]*)`", TEXT["docs/benchmarks.md"])
    assert quoted is not None
    for option in OPTION.findall(quoted[1]):
        assert f'"{option}"' in source, option


@pytest.mark.parametrize("name", sorted({m[1] for _, m in _found(REPO_FILE)}))
def test_every_repository_file_named_exists(name: str) -> None:
    assert (ROOT / name).is_file(), f"{name} is named in the docs but does not exist"


def test_every_extra_named_in_an_install_command_exists() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(pyproject["project"]["optional-dependencies"])
    named = {extra for _, m in _found(EXTRAS) for extra in m[1].split(",")}
    assert named, "no install command found"
    assert named <= extras, f"extras named in the docs but not in pyproject.toml: {named - extras}"
