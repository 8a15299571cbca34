"""A release manifest: the adapters of a release, each paired with its own merged checkpoint, in one file.

Why: a release ships several adapters, each merged into a checkpoint of its own. Written down in a file kept
with the release (and reviewed with it), the pairing is explicit, so a merged checkpoint is never compared with
an adapter that did not make it. JSON or TOML, told by the suffix::

    {"release": [{"adapter": "a", "merged": "a-merged"}, {"adapter": "b"}]}      # or a bare JSON list

    [[release]]
    adapter = "a"
    merged = "a-merged"

``merged`` is optional per entry. Relative paths are relative to the manifest's directory. The manifest is
untrusted input: read through the bounded reader, strict JSON, nothing written, nothing else of it used.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.inputs.errors import InputError
from harness.inputs.files import JsonError, NotRegularFile, parse_json, read_bounded

MAX_MANIFEST_BYTES = 1024 * 1024
KEYS = ("adapter", "merged")
EXAMPLE = '{"release": [{"adapter": "DIR", "merged": "MERGED_DIR"}]}'


def read_release(path: str | Path) -> list[tuple[str, str | None]]:
    """The manifest's (adapter, merged or None) pairs, paths made absolute; ``InputError`` (one line naming the
    file, what is wrong and the fix) for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such release manifest; check the path")
    try:
        raw = read_bounded(path, MAX_MANIFEST_BYTES)
    except NotRegularFile as err:
        raise InputError(f"{path}: {err}; pass the release manifest file (JSON or TOML)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except ValueError as err:
        raise InputError(f"{path}: {err}, too large for a release manifest; list only adapters and merged "
                         "checkpoints") from None
    data = _parse(path, raw)
    entries = data.get("release") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"release"}:
        raise InputError(f"{path}: unknown top-level key {sorted(set(data) - {'release'})[0]!r}; a release manifest "
                         f"holds only 'release', a list of entries like {EXAMPLE}")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: no 'release' list of entries; write it as {EXAMPLE}")
    return [_entry(path, index, entry) for index, entry in enumerate(entries)]


def _parse(path: Path, raw: bytes):
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: pytest, a dependency, brings tomli there
            import tomli as tomllib
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise InputError(f"{path}: not valid TOML ({err}); fix the file, e.g. [[release]] adapter = \"DIR\" "
                             "merged = \"MERGED_DIR\"") from None
    try:
        return parse_json(raw, max_string=10_000)
    except JsonError as err:
        raise InputError(f"{path}: {err}; write it as {EXAMPLE} (or name it .toml)") from None


def _entry(path: Path, index: int, entry) -> tuple[str, str | None]:
    where = f"{path}: entry {index + 1}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} is not a table with 'adapter' (and 'merged'); write it as {EXAMPLE}")
    unknown = [key for key in entry if key not in KEYS]
    if unknown:
        raise InputError(f"{where} has an unknown key {unknown[0]!r}; an entry holds 'adapter' and, optionally, "
                         "'merged'")
    adapter, merged = entry.get("adapter"), entry.get("merged")
    if not isinstance(adapter, str) or not adapter.strip():
        raise InputError(f"{where} has no 'adapter' path; give the adapter directory of each entry")
    if merged is not None and (not isinstance(merged, str) or not merged.strip()):
        raise InputError(f"{where}: 'merged' must be a directory path; leave it out when the adapter has none")
    if "=" in adapter:  # --adapter A=M is how the pair travels on
        raise InputError(f"{where}: the adapter path {adapter!r} holds '=', which pairs an adapter with its merged "
                         "checkpoint; rename the directory")
    base = path.parent
    return _absolute(base, adapter), _absolute(base, merged) if merged is not None else None


def _absolute(base: Path, path: str) -> str:
    """``path`` relative to the manifest's directory, absolute and without ``..`` (symlinks kept as given)."""
    return os.path.abspath(base / Path(path).expanduser())


def as_adapter_args(pairs: list[tuple[str, str | None]]) -> list[str]:
    """The pairs as ``--adapter`` values (``A=M`` where a merged checkpoint is paired, ``A`` alone otherwise)."""
    return [f"{adapter}={merged}" if merged else adapter for adapter, merged in pairs]
