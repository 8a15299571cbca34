"""Primitives for reading untrusted files: stay inside the directory, regular files only, bounded JSON.

Every file the harness reads from an input goes through here: ``open_regular`` refuses a FIFO, socket,
device or directory *before* opening it (a FIFO with no writer blocks ``open`` forever, ``/dev/zero``
never ends) and checks the opened descriptor again; ``parse_json`` is the one strict, bounded JSON
reader (depth, size of numbers, no NaN/Infinity, no lone surrogates, no duplicate keys), used for
configs and safetensors headers alike.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

from harness.inputs.errors import InputError

MAX_CONFIG_BYTES = 10 * 1024 * 1024
MAX_JSON_DEPTH = 64  # configs nest 4-5 deep, safetensors headers 3; serde_json (safetensors) stops at 128
MAX_NUMBER_CHARS = 100  # a JSON number literal longer than this is no config value (Python refuses 4300+ digits)
# A config string (a module name, a regex, a version, a path) longer than this is no config value: a 9 MB string
# fits under MAX_CONFIG_BYTES and would be printed, matched and copied by every reader downstream.
MAX_CONFIG_STRING_CHARS = 100_000
# Files in a model / trainer directory that are pickles but not weights: never collected.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"}
_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or directory where a file belongs. ``str()``: what it is."""


class JsonError(ValueError):
    """Text that is not strict, bounded JSON. ``str()`` says what is wrong, without the file name."""


def check_inside(file_path: Path, root: Path) -> None:
    """A file we read must resolve inside ``root`` (or into a hub snapshot's own ``blobs/``)."""
    try:
        target = file_path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(
            f"{file_path}: a broken or looping symlink; replace it with the real file"
        ) from None
    if target.is_relative_to(root):
        return
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return  # ~/.cache/huggingface/hub/models--x/snapshots/<rev>/file -> ../../blobs/<sha>
    raise InputError(
        f"{file_path}: a symlink to {target}, outside {root}; copy the real file into the directory"
    )


# -- regular files -----------------------------------------------------------------------------------


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)")."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` (symlinks followed) cannot be read as a file, or None when it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; a FIFO, socket, device or directory is refused before opening.

    ``O_NONBLOCK`` keeps a file swapped for a FIFO after the check from blocking, and the opened
    descriptor is checked again, so the answer holds for what was actually opened.
    """
    problem = regular_file_problem(path)
    if problem is not None:
        raise NotRegularFile(problem)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(f"{kind_of(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (``ValueError`` when larger)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ValueError(f"{human_bytes(size)}, over the {human_bytes(limit)} limit")
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while we read
        raise ValueError(f"over the {human_bytes(limit)} limit")
    return data


# -- strict, bounded JSON -----------------------------------------------------------------------------


def parse_json(data: bytes | str, *, max_string: int | None = None):
    """Strict JSON (RFC 8259) with bounds; ``JsonError`` says what is wrong.

    Refused: invalid UTF-8, a BOM, NaN / Infinity / numbers that overflow a float (1e309), number
    literals over ``MAX_NUMBER_CHARS``, nesting over ``MAX_JSON_DEPTH``, strings holding lone UTF-16
    surrogates ("\\ud800", which no UTF-8 file can hold), a key repeated in one object, and (when
    ``max_string`` is given) a string or key longer than ``max_string`` characters, named by its field.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int,
                           parse_float=_bounded_float, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as err:
        raise JsonError(f"not UTF-8 JSON (byte {err.start} is not UTF-8)") from None
    except RecursionError:
        raise JsonError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise JsonError(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    _check_tree(value, max_string)
    return value


def _refuse_constant(name: str):
    raise JsonError(f"{name} is not a JSON number")


def _bounded_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonError(f"a {len(literal)}-digit integer")
    return int(literal)


def _bounded_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonError(f"a {len(literal)}-character number")
    value = float(literal)
    if not math.isfinite(value):
        raise JsonError(f"the number {literal[:30]} overflows a 64-bit float")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JsonError(f"the key {repeated[:80]!r} appears twice in one object")
    return value


def _check_tree(value, max_string: int | None = None) -> None:
    """Depth, lone surrogates and (optionally) string lengths, without recursion."""
    stack: list[tuple[object, int, tuple]] = [(value, 1, ())]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            _check_string(item, max_string, where)
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise JsonError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_string(key, max_string, where, is_key=True)
                    stack.append((child, depth + 1, (*where, key)))
            else:
                stack.extend((child, depth + 1, (*where, index)) for index, child in enumerate(item))


def field_name(where: tuple) -> str:
    """A JSON location for a message: ``target_modules``, ``rank_pattern["a.b"]``, ``layers[3]`` (parts cut)."""
    text = ""
    for part in where:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if len(part) <= 40 else f"{part[:39]}…"
            text += shown if not text and shown.isidentifier() else f"[{json.dumps(shown)}]"
    return text or "the top level"


def _check_string(text: str, max_string: int | None = None, where: tuple = (), is_key: bool = False) -> None:
    if max_string is not None and len(text) > max_string:
        what = f"a key in {field_name(where)}" if is_key and where else "a key" if is_key else \
            f"the value of {field_name(where)}"
        raise JsonError(f"{what} is a string of {len(text):,} characters, over the {max_string:,}-character "
                        "limit for a config value")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise JsonError(f"a string holds the lone surrogate \\u{ord(text[err.start]):04x}, which is not "
                        "valid Unicode") from None


def read_json_object(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a config file (regular, at most ``limit`` bytes, strict and bounded JSON).

    Raises ``InputError``: one line naming the file, what is wrong and the fix.
    """
    fix = "regenerate it with save_pretrained"
    try:
        value = parse_json(read_bounded(path, limit), max_string=MAX_CONFIG_STRING_CHARS)
    except NotRegularFile as err:
        raise InputError(f"{path}: {err}; replace it with the file save_pretrained writes") from None
    except JsonError as err:
        raise InputError(f"{path}: {err}; {fix}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except ValueError as err:
        raise InputError(f"{path}: {err}, too large for a config file; {fix}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: a JSON {json_type(value)}, not an object; {fix}")
    return value


def read_model_config(directory: str | Path) -> dict:
    """A model directory's ``config.json`` ({} when there is none), read as untrusted input: inside the
    directory, a regular file, strict and bounded JSON. ``InputError`` (one line) otherwise."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not os.path.lexists(config_path):
        return {}
    check_inside(config_path, directory.resolve())
    return read_json_object(config_path)


def refuse_special_files(directory: Path, what: str) -> None:
    """``InputError`` naming the first FIFO, socket or device among ``directory``'s entries (symlinks followed).

    A model directory is read by the libraries too (transformers opens config.json, generation_config.json,
    tokenizer files and *.py; safetensors the shards): one such entry would block or never end there, where
    the harness's own guards do not reach, so it is refused before anything loads the directory.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as err:
        raise InputError(f"{directory}: cannot list the {what} directory ({err.strerror}); check its permissions") \
            from None
    for entry in entries:
        try:
            mode = entry.stat().st_mode  # follows symlinks
        except OSError:
            continue  # a broken symlink: the reader that needs the file says so
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"{entry.path}: {kind_of(mode)} in the {what} directory, where only files belong; "
                             "remove it or copy the real file in its place")


def looks_like_weights(path: Path) -> bool:
    """A weights file by name, and a regular file (so a FIFO named ``model.bin`` is never opened)."""
    if path.name in _NOT_WEIGHTS or path.name.startswith("rng_state"):
        return False
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth") and regular_file_problem(path) is None


def json_type(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def human_bytes(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1024 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def one_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
