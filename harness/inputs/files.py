"""Primitives for reading untrusted files: stay inside the directory, bounded JSON, short messages."""

from __future__ import annotations

import json
from pathlib import Path

from harness.inputs.errors import InputError

MAX_CONFIG_BYTES = 10 * 1024 * 1024
# Files in a model / trainer directory that are pickles but not weights: never collected.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"}


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




def read_json_object(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: {human_bytes(size)}, too large for a config file; regenerate it with save_pretrained")
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except InputError:
        raise
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({one_line(err)}); regenerate it with save_pretrained") from None
    if not isinstance(value, dict):
        raise InputError(
            f"{path}: a JSON {json_type(value)}, not an object; regenerate it with save_pretrained"
        )
    return value


def looks_like_weights(path: Path) -> bool:
    if path.name in _NOT_WEIGHTS or path.name.startswith("rng_state") or not path.is_file():
        return False
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth")


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
