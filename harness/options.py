"""Every option of a check run, declared once: ``OPTIONS``.

Why: the same option used to be declared in the CLI parser, the pytest plugin, three API signatures and the
``[tool.plora-harness]`` reader, and they drifted (a key the CLI knew and pyproject did not, a timeout the
plugin parsed differently). Each ``Option`` row says what the option is (kind, default, help) and where it
appears; the CLI parser, the plugin's ``--plora-*`` options, the pyproject keys, the ``PLORA_HARNESS_*``
variables and the public API's keyword arguments (``api_options``: a real signature, for ``help()``) are all
built from the rows, and every value is parsed and validated here, once, whatever door it came in by.

Where a value comes from (the command line, then the environment variable, then ``[tool.plora-harness]``,
then the default; the same for the CLI and the plugin) is ``harness.settings``.
Importing this module imports no torch, and nothing here knows about pytest or argparse.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.dtypes import DType
from harness.inputs.errors import InputError
from harness.model.quantization import TRAINED_ON_CHOICES

ENV_PREFIX = "PLORA_HARNESS_"
PLUGIN_PREFIX = "--plora-"
SETTINGS_TABLE = "plora-harness"

# kinds: how a value is written and what it becomes
FLAG, PATH, PATHS, IDS, CHOICE, SIZE, TIMEOUT, LAYERS = ("flag", "path", "paths", "ids", "choice", "size", "timeout",
                                                         "layers")


@dataclass(frozen=True)
class Option:
    """One option of a check run, and every door it comes in by."""

    name: str  # API keyword, argparse dest; the flags, variable and key are derived from it
    kind: str
    help: str
    default: Any = None
    annotation: str | None = None  # the API's type hint, as written in a signature
    group: str = "run"  # CLI help group: "inputs", "run" or "output"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    cli: bool = True  # `plora-harness check --<name>` (and `demo`, for the run and output groups)
    plugin: bool = True  # pytest --plora-<name>
    env: bool = True  # PLORA_HARNESS_<NAME>
    settings: bool = True  # <name> in [tool.plora-harness]
    api: bool = True  # a keyword of check / check_adapters / plan_run
    aliases: tuple[str, ...] = ()  # other pyproject keys for it
    plugin_flag: str | None = None  # when the plugin's flag is not --plora-<name>

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def plugin_option(self) -> str:
        return self.plugin_flag or PLUGIN_PREFIX + self.name.replace("_", "-")

    @property
    def plugin_dest(self) -> str:
        return self.plugin_option.lstrip("-").replace("-", "_")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def key(self) -> str:
        return self.name.replace("_", "-")

    @property
    def repeatable(self) -> bool:
        return self.kind in (PATHS, IDS)


OPTIONS: tuple[Option, ...] = (
    Option("adapter", PATHS, "PEFT adapter directory (or DeepSpeed checkpoint directory, or a folder of adapters); "
           "repeat to check several adapters against one base; DIR=MERGED pairs it with its merged checkpoint",
           group="inputs", metavar="DIR[=MERGED]", api=False, aliases=("adapters",)),
    Option("release", PATH, "a release manifest (JSON or TOML): its adapters, each with its merged checkpoint "
           '(e.g. {"release": [{"adapter": "A", "merged": "MA"}]}); checked with any --adapter given',
           group="inputs", metavar="FILE", plugin=False, env=False, settings=False, api=False),
    Option("base_model", PATH, "base model directory: adds the loading and numerical checks", group="inputs",
           metavar="DIR", api=False),
    Option("merged", PATHS, "merged checkpoint to verify against base + adapter (needs the base model); repeat it, "
           "one per adapter in the same order", group="inputs", metavar="DIR", api=False),
    Option("trust_remote_code", FLAG, "allow the base model's own Python code (auto_map) to run, in a child process; "
           "the report lists each file with its sha256", default=False, annotation="bool", group="inputs"),
    Option("demo", FLAG, "check the built-in synthetic demo instead (the same as `plora-harness demo`)",
           default=False, annotation="bool", group="inputs", plugin=False, env=False, settings=False),
    Option("only", IDS, "run only this check id (repeatable; `plora-harness list` shows the ids)", default=(),
           annotation="Sequence[str]", metavar="ID"),
    Option("skip", IDS, "do not run this check id (repeatable)", default=(), annotation="Sequence[str]", metavar="ID"),
    Option("dtype", CHOICE, "dtype for the dynamic checks (default: the dtype the checkpoint is stored in)",
           annotation="DType | str | None", choices=DType.names()),
    Option("trained_on_quantized", CHOICE, "the adapter was trained on the base quantized this way (QLoRA): "
           "measure qlora-merge-gap", annotation="str | None", choices=TRAINED_ON_CHOICES),
    Option("device", CHOICE, "device for the dynamic checks (default cpu)", default="cpu", annotation="str",
           choices=("cpu", "cuda")),
    Option("allow_plora_targets", FLAG, "turn lora-on-plora from a failure into a warning", default=False,
           annotation="bool"),
    Option("max_memory", SIZE, "memory the dynamic checks may use, e.g. 8GiB (default: the RAM or GPU memory "
           "available); a base that does not fit is checked on depth slices of its layers",
           annotation="str | int | None", metavar="SIZE"),
    Option("layers", LAYERS, "run the dynamic checks on the depth slice of these decoder layers only (e.g. 16-23): "
           "one CI job per slice spreads a large base's check; the static and merged checks still read it all",
           annotation="str | Sequence[int] | None", metavar="FIRST-LAST", plugin=False, env=False, settings=False),
    Option("timeout", TIMEOUT, "limit per adapter for the engine process (default 'auto': 10 minutes plus 15 "
           "minutes per GiB of model weights; 'none': no limit); checks it did not finish fail", default="auto",
           annotation="float | str | None", metavar="SECONDS"),
    Option("json", PATH, "write the JSON report here ('-' for stdout, then the table goes to stderr)", group="output",
           metavar="PATH", plugin=False, env=False, api=False),
    Option("junit", PATH, "write a JUnit XML report here", group="output", metavar="PATH", plugin=False, env=False,
           api=False),
    Option("report", PATH, "write the JSON conformance report here", group="output", metavar="PATH", cli=False,
           env=False, api=False, settings=False),
    Option("quiet", FLAG, "no progress on stderr", default=False, group="output", plugin=False, env=False,
           settings=False, api=False),
    Option("verbose", FLAG, "details of every check, and the engine's own output on stderr", default=False,
           group="output", plugin=False, env=False, settings=False, api=False),
)


def named(name: str) -> Option:
    return next(o for o in OPTIONS if o.name == name)


def settings_keys() -> dict[str, Option]:
    """The ``[tool.plora-harness]`` keys, each with its option."""
    return {k: o for o in OPTIONS if o.settings for k in (o.key, *o.aliases)}


# ---- values: parsed from text (command line, variable) or checked as given (API, pyproject) ----------------

def _bad(where: str, expected: str, value: Any) -> InputError:
    return InputError(f"{where} must be {expected}, not {value!r}")


def from_text(option: Option, text: str, where: str, *, several: bool = False) -> Any:
    """A value written as text: one command-line value, or with ``several`` (a variable) every value of a
    repeatable option, paths separated by os.pathsep and check ids by commas."""
    if option.kind == FLAG:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise _bad(where, "1/true/yes or 0/false/no", text)
    if option.kind == TIMEOUT and text.strip().lower() in ("auto", "none"):
        return None if text.strip().lower() == "none" else "auto"
    if option.kind == TIMEOUT:
        try:
            return from_value(option, float(text), where)
        except ValueError:
            raise _bad(where, "a positive number of seconds, 'auto' or 'none'", text) from None
    if option.repeatable and several:
        separator = os.pathsep if option.kind == PATHS else ","
        return from_value(option, [p.strip() for p in text.split(separator) if p.strip()], where)
    return from_value(option, text, where)


def from_value(option: Option, value: Any, where: str) -> Any:
    """``value`` checked (and made the option's one type: a tuple of ids, a ``DType``, bytes) for ``option``."""
    kind = option.kind
    if kind == FLAG:
        if not isinstance(value, bool):
            raise _bad(where, "true or false", value)
        return value
    if kind == CHOICE:
        if value is None and option.default is None:
            return None
        text = value if isinstance(value, str) else str(value).removeprefix("torch.")
        if text not in option.choices:
            raise InputError(f"{where} {value!r} is not one of {', '.join(option.choices)}")
        return DType.of(text) if option.name == "dtype" else text
    if kind == TIMEOUT:
        if value == "auto" or value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _bad(where, "a positive number of seconds", value)
        return float(value)
    if kind == SIZE:
        if value is None:
            return None
        from harness.loading.slices import parse_memory  # imports torch: only when a budget is given

        try:
            budget = parse_memory(value) if not isinstance(value, bool) else -1
        except ValueError as err:
            raise InputError(f"{where}: {err}") from None
        if budget <= 0:
            raise InputError(f"{where} must be a positive size, not {value!r}")
        return budget
    if kind == LAYERS:
        if value is None:
            return None
        from harness.loading.slices import parse_layers

        try:
            return parse_layers(value)
        except (ValueError, TypeError) as err:
            raise InputError(f"{where}: {err}") from None
    if kind == PATH:
        if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value).strip()):
            raise _bad(where, "a path", value)
        return value
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, os.PathLike)) for i in items):
        raise _bad(where, "a string or a list of strings", value)
    return tuple(items) if kind == IDS else list(items)


# ---- the API ----------------------------------------------------------------------------------------------

def api_options(func: Callable) -> Callable:
    """Give ``func`` (written with ``**options``) every ``api`` option of the table as a keyword-only parameter,
    in a real signature (``help()``, ``inspect.signature``); each value is checked and made its one type
    (``InputError`` for a value that cannot be used, ``TypeError`` with a "did you mean" for an unknown keyword)
    before ``func`` runs, which receives them all, defaults included, as ``**options``."""
    own = inspect.signature(func)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    table = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                               annotation=o.annotation or inspect.Parameter.empty)
             for o in OPTIONS if o.api]
    clash = {p.name for p in params} & {p.name for p in table}
    if clash:
        raise TypeError(f"{func.__qualname__} declares {sorted(clash)} itself; they come from harness.options")
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    signature = own.replace(parameters=[*positional, *table, *keyword])
    names = {o.name for o in OPTIONS if o.api}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        unknown = [k for k in kwargs if k not in signature.parameters]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(signature.parameters), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{func.__name__}() got an unexpected keyword argument {unknown[0]!r}{hint}")
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        options = {n: from_value(named(n), given.pop(n), n) for n in list(given) if n in names}
        return func(**given, **options)

    wrapper.__signature__ = signature
    return wrapper
