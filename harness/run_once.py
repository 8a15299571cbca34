"""Compute a JSON-able result once for several processes sharing a directory (a file lock).

Why: under pytest-xdist every worker collects the conformance items, and each would otherwise run
the whole engine (model loads included) again. The first process to take the lock computes and
writes the result; the others wait and read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def computed_once(directory: Path | None, key: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per ``directory``/``key`` across processes; ``directory=None`` just computes."""
    if directory is None:
        return compute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key}.json"
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return json.loads(target.read_text())
        result = compute()
        partial = target.with_suffix(".partial")
        partial.write_text(json.dumps(result, allow_nan=False))
        partial.replace(target)
        return result
