"""Build-once on-disk cache for synthetic artefacts, safe under ``pytest -n auto``.

Each artefact lives in ``root/<name>-<digest>``; the digest covers the build
parameters, the library versions and the harness sources that write it. A file
lock serialises builders, and a build goes to a temporary sibling that is renamed
into place only when complete, so a reader never sees half a directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

_SOURCES = Path(__file__).parent


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_SOURCES.rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update((_SOURCES.parent / "numerics" / "probes.py").read_bytes())
    return h.hexdigest()[:12]


def cache_key(params: dict) -> str:
    import peft
    import torch
    import transformers

    payload = {
        "params": params,
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
        "sources": _source_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(root: str | Path, name: str, params: dict) -> Path:
    """Where ``cached_build`` keeps (or will keep) the artefact ``name`` built with ``params``."""
    return Path(root) / f"{name.replace('.', 'd')}-{cache_key(params)}"


def cached_build(root: str | Path, name: str, params: dict, build: Callable[[Path], None]) -> Path:
    """Return ``root/<name>-<key>``, calling ``build(tmp_dir)`` once if it does not exist yet.

    Dots in ``name`` become ``d`` (``ixc2.5`` -> ``ixc2d5``, as the real hub repos spell it): transformers
    before 4.4x cannot import remote code from a folder whose name contains a dot.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = cache_path(root, name, params)
    if target.is_dir():
        return target
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
