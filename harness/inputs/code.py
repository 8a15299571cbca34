"""Which Python code a model directory would run, so that none of it runs without the user's consent.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` imports the modules that
``config.json``'s ``auto_map`` names (and, through them, their sibling ``*.py`` files). That is code
from the input, as untrusted as a pickle: the harness runs it only when the user opted in, as the
ecosystem's ``trust_remote_code`` convention asks, and then lists each file with its sha256.
Reading this needs no torch and runs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from harness.inputs.errors import InputError
from harness.inputs.files import (
    check_inside,
    open_regular,
    read_model_config,
    refuse_special_files,
    regular_file_problem,
)


@dataclass(frozen=True)
class CodeFile:
    path: Path
    sha256: str

    def to_dict(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256}


class UntrustedCode(InputError):
    """A directory holds code that would run, and the user did not opt in. ``str()`` is one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remote_code_files(model_dir: str | Path) -> list[CodeFile]:
    """The code ``from_pretrained(model_dir, trust_remote_code=True)`` may run: every ``*.py`` beside a
    ``config.json`` whose ``auto_map`` names custom classes; nothing when there is no ``auto_map``
    (transformers then uses its own classes and imports nothing from the directory)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = read_model_config(model_dir)  # a FIFO, a symlink out, deep or non-strict JSON: InputError, exit 2
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    if not isinstance(auto_map, dict):
        raise InputError(f"{config_path}: auto_map is not an object; re-save the model with save_pretrained")
    for entry in auto_map.values():
        for reference in entry if isinstance(entry, list) else [entry]:
            if isinstance(reference, str) and "--" in reference:
                repo = reference.split("--", 1)[0]
                raise InputError(
                    f"{config_path}: auto_map points at code in another repository ({repo}), which from_pretrained "
                    "would download and run; copy that code into the directory and name it without the 'repo--' "
                    "prefix"
                )
    return [CodeFile(path, sha256_of(path)) for path in _code_paths(model_dir)]


def _code_paths(model_dir: Path) -> list[Path]:
    """The directory's ``*.py`` files; one that is not a regular file inside the directory is refused."""
    root = model_dir.resolve()
    paths = sorted(model_dir.glob("*.py"))
    for path in paths:
        check_inside(path, root)
        problem = regular_file_problem(path)
        if problem is not None:
            raise InputError(f"{path}: {problem}; the model's code files must be regular files, re-download them")
    return paths


def require_trust(model_dirs: dict[str, Path], trusted: bool, *, flag: str = "--trust-remote-code") -> list[CodeFile]:
    """The code files of every directory (``{"base model": dir, ...}``); raise ``UntrustedCode`` naming them
    and the flag when there are some and the user did not opt in. Runs before anything loads a directory,
    so a FIFO, socket or device in one is refused here too (``InputError``, exit 2)."""
    found: list[CodeFile] = []
    for what, directory in model_dirs.items():
        refuse_special_files(Path(directory), what)  # transformers would open them, and block there
        files = remote_code_files(directory)
        if files and not trusted:
            names = ", ".join(f.path.name for f in files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")
            raise UntrustedCode(
                f"{directory}: the {what} ships Python code that loading it would run ({names}); read it, then "
                f"pass {flag} to allow it"
            )
        found.extend(files)
    return found
