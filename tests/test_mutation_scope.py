"""Mutation testing sees every check body: mutmut (scripts/mutation-test.sh) skips decorated functions, so the
checks and loading paths in its scope are plain functions registered by a call after them, not decorators."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
REGISTRARS = {"register", "loading_path"}


def _scope() -> list[Path]:
    """The files mutmut mutates (its globs: fnmatch, ``*`` spans folders)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    names = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "harness").rglob("*.py"))]
    return [ROOT / n for n in names if any(fnmatch(n, g) for g in config["only_mutate"])
            and not any(fnmatch(n, g) for g in config.get("do_not_mutate", []))]


def registered_by_decorator(source: str) -> list[str]:
    """Names of the top-level functions ``source`` registers with ``@register(...)`` / ``@loading_path(...)``."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                call = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(call, ast.Name) and call.id in REGISTRARS:
                    found.append(node.name)
    return found


def test_the_scope_covers_the_checks_and_the_loading_paths():
    scope = {p.relative_to(ROOT).as_posix() for p in _scope()}
    checks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "harness/checks").glob("*.py")}
    assert checks <= scope, sorted(checks - scope)
    assert "harness/loading/paths.py" in scope


def test_no_registered_function_in_the_scope_is_decorated():
    offenders = {p.name: names for p in _scope() if (names := registered_by_decorator(p.read_text()))}
    assert offenders == {}, f"register these after the function (register(...)(func)), not as decorators: {offenders}"


def test_the_guard_sees_a_decorated_check():
    source = '@register(id="x", group="static", summary="", why="", fix="")\ndef check_x(ctx):\n    pass\n'
    assert registered_by_decorator(source) == ["check_x"]
    assert registered_by_decorator(source.replace("@register", "@loading_path")) == ["check_x"]
    assert registered_by_decorator('def check_x(ctx):\n    pass\n\n\nregister(id="x")(check_x)\n') == []
