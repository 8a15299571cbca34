"""Where each option's value comes from: the command line, then ``PLORA_HARNESS_<NAME>``, then
``[tool.plora-harness]`` in the user's ``pyproject.toml``, then the default; the same for the CLI and the plugin.

Why: a CI gate should read the same inputs every run without a long command line that an empty variable
can silently shorten, and a repository's standing options should mean the same under ``plora-harness check``
and under ``pytest``. Paths in the pyproject are relative to its folder. An unknown key, or a variable set but
empty, is a usage error (one line), never ignored. The options themselves are declared in ``harness.options``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import options as table
from harness.inputs.errors import InputError
from harness.options import FLAG, PATH, PATHS, SETTINGS_TABLE, TIMEOUT, Option, from_text, from_value

# ---- where a value came from, in order of precedence ------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    """Each option's value and where it came from ("--only", "PLORA_HARNESS_ONLY", "<pyproject> only", None)."""

    values: dict[str, Any]
    sources: dict[str, str | None]

    def given(self) -> list[str]:
        """The sources of every option that did not fall back to its default."""
        return [s for s in self.sources.values() if s is not None]


def resolve(surface: str, given: Mapping[str, Any], *, environ: Mapping[str, str] | None = None,
            pyproject: Path | None = None, fallbacks: bool = True) -> Resolved:
    """Every option of ``surface`` ("cli" or "plugin"): the command line (``given``: option name -> its text, a
    list of texts for a repeatable option, True for a flag; absent: not given), else ``PLORA_HARNESS_<NAME>``,
    else ``[tool.plora-harness]`` in ``pyproject``, else the default. ``fallbacks=False`` (the demo) reads the
    command line only. Raises ``InputError`` (one line) for a value that cannot be used, a variable set but
    empty, or an unknown pyproject key."""
    environ = os.environ if environ is None else environ
    rows = [o for o in table.OPTIONS if (o.cli if surface == "cli" else o.plugin)]
    settings = load_settings(pyproject) if fallbacks else {}
    values: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    for option in rows:
        flag = option.flag if surface == "cli" else option.plugin_option
        raw = environ.get(option.env_var) if option.env and fallbacks else None
        if raw is not None and not raw.strip(os.pathsep + ", \t"):
            raise InputError(f"{option.env_var} is set but empty (an unset variable?); set it to the value, or "
                             "unset it")
        if option.name in given:
            value, source = given[option.name], flag
            if option.kind == FLAG:
                value = bool(value)
            elif option.repeatable:
                value = from_value(option, [_nonempty(t, flag) for t in value], flag)
            else:
                value = _text(option, value, flag)
        elif raw is not None:
            value, source = from_text(option, raw, option.env_var, several=True), option.env_var
        elif option.name in settings:
            value, source = settings[option.name], f"{pyproject} [tool.{SETTINGS_TABLE}] {option.key}"
        else:
            value, source = option.default, None
        values[option.name], sources[option.name] = value, source
    return Resolved(values, sources)


def _nonempty(text: Any, flag: str) -> Any:
    if isinstance(text, str) and not text.strip():
        raise InputError(f"{flag} is empty (an unset or empty variable?); pass the value")
    return text


def _text(option: Option, text: Any, flag: str) -> Any:
    if not isinstance(text, str):
        return from_value(option, text, flag)
    return from_text(option, _nonempty(text, flag), flag)


# ---- [tool.plora-harness] ---------------------------------------------------------------------------------

def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` from ``start`` (the working directory) upwards."""
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(pyproject: Path | None) -> dict[str, Any]:
    """``[tool.plora-harness]`` as option names and checked values (paths made absolute against the pyproject's
    folder); {} when there is none. An unknown key is a usage error with a "did you mean", never ignored."""
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
    section = data.get("tool", {}).get(SETTINGS_TABLE)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise InputError(f"{pyproject}: [tool.{SETTINGS_TABLE}] must be a table of options")
    settings: dict[str, Any] = {}
    keys = table.settings_keys()
    for key, value in section.items():
        option = keys.get(key)
        if option is None:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(keys)}"
            raise InputError(f"{pyproject}: [tool.{SETTINGS_TABLE}] has an unknown key {key!r}{hint}")
        where = f"{pyproject}: [tool.{SETTINGS_TABLE}] {key}"
        if option.kind == TIMEOUT and isinstance(value, str):
            value = from_text(option, value, where)
        checked = from_value(option, value, where)
        if option.kind == PATH and checked == "-" and option.name == "json":
            settings[option.name] = checked  # stdout
        elif option.kind == PATH:
            if not isinstance(checked, str) or not checked.strip():
                raise InputError(f"{where} must be a non-empty path, not {value!r}")
            settings[option.name] = str(pyproject.parent / checked)
        elif option.kind == PATHS:
            settings[option.name] = [_pair_path(pyproject, str(p)) for p in checked]
        else:
            settings[option.name] = checked
    return settings


def _pair_path(pyproject: Path, text: str) -> str:
    """A path relative to the pyproject's folder; ``A=M`` (an adapter paired with its merged model) both sides."""
    if not text.strip():
        raise InputError(f"{pyproject}: [tool.{SETTINGS_TABLE}] has an empty path")
    base = pyproject.parent
    if "=" in text and not (base / text).exists():
        left, right = text.split("=", 1)
        return f"{base / left}={base / right}"
    return str(base / text)
