"""``[tool.plora-harness]`` in the user's ``pyproject.toml``: a repository's standing ``check`` options.

Why: a CI gate should read the same inputs every run without a long command line that an empty variable
can silently shorten. Options given on the command line win; paths are relative to the pyproject's folder.
An unknown key is a usage error (with a "did you mean"), never ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from harness.inputs.errors import InputError

TABLE = "plora-harness"
# key -> (argparse dest, kind): "path", "paths", "bool", "str", "strs", "number"
KEYS = {
    "adapter": ("adapters", "paths"), "adapters": ("adapters", "paths"), "base-model": ("base_model", "path"),
    "merged": ("merged", "paths"), "trust-remote-code": ("trust_remote_code", "bool"),
    "only": ("only", "strs"), "skip": ("skip", "strs"), "dtype": ("dtype", "str"), "device": ("device", "str"),
    "allow-plora-targets": ("allow_plora_targets", "bool"), "timeout": ("timeout", "number"),
    "max-memory": ("max_memory", "str"),
    "json": ("json_path", "path"), "junit": ("junit_path", "path"),
}


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` from ``start`` (the working directory) upwards."""
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(pyproject: Path | None) -> dict:
    """The table as argparse destinations and values (paths made absolute); {} when there is none."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest, a dependency, brings tomli there
        import tomli as tomllib

    if pyproject is None:
        return {}
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{pyproject}: cannot be read as TOML ({err}); fix the file") from None
    table = data.get("tool", {}).get(TABLE)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise InputError(f"{pyproject}: [tool.{TABLE}] must be a table of options")
    settings: dict = {}
    for key, value in table.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(KEYS)}"
            raise InputError(f"{pyproject}: [tool.{TABLE}] has an unknown key {key!r}{hint}")
        dest, kind = KEYS[key]
        settings[dest] = _value(pyproject, key, value, kind)
    return settings


def _value(pyproject: Path, key: str, value, kind: str):
    def wrong(expected: str) -> InputError:
        return InputError(f"{pyproject}: [tool.{TABLE}] {key} must be {expected}, not {value!r}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise wrong("a positive number of seconds")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if kind in ("strs", "paths"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise wrong("a string or a list of strings")
        return [_pair_path(pyproject, i) for i in items] if kind == "paths" else items
    if not isinstance(value, str) or not value.strip():
        raise wrong("a non-empty path")
    return str(pyproject.parent / value)


def _pair_path(pyproject: Path, text: str) -> str:
    """A path relative to the pyproject's folder; ``A=M`` (an adapter paired with its merged model) both sides."""
    if not text.strip():
        raise InputError(f"{pyproject}: [tool.{TABLE}] has an empty path")
    base = pyproject.parent
    if "=" in text and not (base / text).exists():
        left, right = text.split("=", 1)
        return f"{base / left}={base / right}"
    return str(base / text)
