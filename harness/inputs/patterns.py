"""The regular expressions an adapter_config.json hands to PEFT, compiled and matched with a time bound.

PEFT builds regexes from the config (``target_modules`` as a string, ``rank_pattern`` /
``alpha_pattern`` keys, ``layers_pattern``, ``exclude_modules``, ``modules_to_save``) and matches them
with Python's ``re`` against every module name. A config is input: a pattern such as
``(([a-z.]|[a-z.])+)+#`` backtracks for ever on any dotted name, so nothing here (nor PEFT, after a
screening here) matches one without a deadline. The deadline must bound *Python's* ``re``, the
engine PEFT uses: the ``regex`` package answers some patterns instantly that ``re`` never finishes.
``re`` checks for signals while it backtracks, so in the main thread a ``SIGALRM`` timer interrupts it;
elsewhere the match runs in a short-lived child interpreter that is killed at the deadline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MATCH_BUDGET_S = 1.0  # one pattern against every module name of a model: microseconds each when sane
MAX_PATTERN_CHARS = 10_000
_COSTLY: dict[tuple[str, str], tuple[int, float]] = {}  # (source, mode) found too costly -> (names, budget)


class PatternTooCostly(ValueError):
    """Matching a config regex did not finish within the budget (PEFT's ``re`` would hang on it)."""


class Expired(BaseException):
    """Raised by the timer inside ``re``; a BaseException so no ``except Exception`` swallows it."""


@dataclass(frozen=True)
class ConfigPattern:
    """One regex PEFT builds from the config: where it comes from, and the source PEFT compiles."""

    field: str  # "target_modules", "rank_pattern", ...
    raw: str  # as written in adapter_config.json
    source: str  # as PEFT splices it into the regex it compiles
    mode: str  # "fullmatch" or "match", as PEFT calls it

    def describe(self) -> str:
        kind = " key" if self.field in ("rank_pattern", "alpha_pattern") else ""
        return f"{self.field}{kind} {_short(self.raw)!r}"


# -- how the installed PEFT splices config values into regexes ------------------------------------------


@functools.lru_cache(maxsize=None)
def _peft_at_least(version: str) -> bool:
    from packaging.version import Version

    from harness.compat import PEFT_VERSION

    return Version(str(PEFT_VERSION)) >= Version(version)


def pattern_key_source(key: str) -> str:
    """A rank_pattern / alpha_pattern key as the installed PEFT matches it (``get_pattern_key``)."""
    if _peft_at_least("0.15"):
        return rf"(.*\.)?({key})$"
    return rf".*\.{key}$"  # PEFT 0.8 - 0.14: LoraModel._create_and_replace / get_pattern_key


def _layers_pattern_source(pattern: str) -> str:
    if _peft_at_least("0.21"):
        return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
    if _peft_at_least("0.20"):
        return rf".*?\.{pattern}\.(\d+)\."
    return rf".*\.{pattern}\.(\d+)\."


def config_patterns(config: dict) -> list[ConfigPattern]:
    """Every regex the installed PEFT would build from this config (strings only; types are config-valid's)."""
    found: list[ConfigPattern] = []
    targets = config.get("target_modules")
    if isinstance(targets, str):
        found.append(ConfigPattern("target_modules", targets, targets, "fullmatch"))
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and _peft_at_least("0.14"):
        found.append(ConfigPattern("exclude_modules", excluded, excluded, "fullmatch"))
    saved = config.get("modules_to_save")
    if isinstance(saved, list) and _peft_at_least("0.16"):
        found += [ConfigPattern("modules_to_save", m, rf"(^|.*\.){m}($|\..*)", "match") for m in saved
                  if isinstance(m, str)]
    layers = config.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers if isinstance(layers, list) else []:
        if isinstance(pattern, str) and pattern:
            found.append(ConfigPattern("layers_pattern", pattern, _layers_pattern_source(pattern), "match"))
    for name in ("rank_pattern", "alpha_pattern"):
        table = config.get(name)
        if isinstance(table, dict):
            found += [ConfigPattern(name, key, pattern_key_source(key), "match") for key in table if isinstance(key, str)]
    return found


# -- compiling -----------------------------------------------------------------------------------------


def compile_problem(pattern: ConfigPattern) -> str | None:
    """Why PEFT's ``re.compile`` of this pattern fails (or takes too long), or None."""
    if len(pattern.source) > MAX_PATTERN_CHARS:
        return f"{pattern.describe()} is {len(pattern.raw)} characters long, over {MAX_PATTERN_CHARS}"
    try:
        with deadline(MATCH_BUDGET_S):
            re.compile(pattern.source)
    except re.error as err:
        return f"{pattern.describe()} is not a valid regular expression ({err})"
    except (RecursionError, OverflowError, ValueError) as err:  # nesting too deep, repeat counts too large
        return f"{pattern.describe()} is not a valid regular expression ({type(err).__name__}: {_short(str(err))})"
    except Expired:
        return f"{pattern.describe()} takes over {MATCH_BUDGET_S:g} s to compile"
    return None


# -- matching with a deadline --------------------------------------------------------------------------


def bounded_matches(pattern: ConfigPattern, names: Iterable[str], budget_s: float = MATCH_BUDGET_S) -> list[str]:
    """The ``names`` this pattern matches as PEFT matches it; ``PatternTooCostly`` past ``budget_s`` in all
    (remembered: the same regex is not tried again in this process). ``re.error`` when it does not compile."""
    names = list(names)
    if len(pattern.source) > MAX_PATTERN_CHARS:  # compile_problem says so; never compiled here
        raise re.error(f"over {MAX_PATTERN_CHARS} characters")
    compiled = re.compile(pattern.source)
    try:
        if (pattern.source, pattern.mode) in _COSTLY:
            raise Expired
        if _can_interrupt():
            test = compiled.fullmatch if pattern.mode == "fullmatch" else compiled.match
            with deadline(budget_s):
                hits = [n for n in names if test(n)]
        else:
            hits = _match_in_child(pattern, names, budget_s)
    except Expired:
        tried = _COSTLY.setdefault((pattern.source, pattern.mode), (len(names), budget_s))
        raise PatternTooCostly(
            f"{pattern.describe()} is too costly to match: {tried[0]} module name(s) took over {tried[1]:g} s "
            "(catastrophic backtracking; PEFT's re would hang on it)"
        ) from None
    return hits


def _can_interrupt() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``Expired`` in this thread after ``seconds`` (also inside ``re``); a no-op outside the main thread.

    The previous ``SIGALRM`` handler and timer are restored afterwards (the timer minus the time spent).
    """
    if not _can_interrupt():
        yield
        return
    armed = True

    def expire(signum, frame) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise Expired

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_timer, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer > 0:
            remaining = max(previous_timer - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
test = getattr(re.compile(job["source"]), job["mode"])
json.dump([i for i, n in enumerate(job["names"]) if test(n)], sys.stdout)
"""


def _match_in_child(pattern: ConfigPattern, names: list[str], budget_s: float) -> list[str]:
    """Outside the main thread no timer can interrupt ``re``: match in a child interpreter, killed at the deadline."""
    job = json.dumps({"source": pattern.source, "mode": pattern.mode, "names": names}, ensure_ascii=True)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], input=job, capture_output=True, text=True,
                              timeout=budget_s + 5.0, check=True)  # + interpreter start-up
    except subprocess.TimeoutExpired:
        raise Expired from None
    return [names[i] for i in json.loads(done.stdout)]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
