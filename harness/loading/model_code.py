"""Running a model's own code: where in its files something happened, no network, and failures explained.

Model code from a directory runs from transformers' dynamic-module cache (``.../transformers_modules/
<dir>/<file>.py``) or from the directory itself. ``model_code_frame`` finds the innermost frame in such
a file, so a failure can name ``modeling_x.py:12`` instead of a line deep in transformers.

``network_blocked`` refuses every outgoing connection while a run is in progress (a local directory
must never turn into a hub download or a URL fetch) and records who asked; a load that then fails
because the model code needed the network is an unusable input, said in one line with file and line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

_MODULES_MARKER = f"{os.sep}transformers_modules{os.sep}"
_code_dirs: list[Path] = []  # model directories whose *.py the user trusted for this run
_consent: list[bool] = [False]  # the user's decision on running model code (a plan's trust_remote_code)


@contextlib.contextmanager
def remote_code_consent(trusted: bool):
    """The user's decision (``--trust-remote-code``, ``trust_remote_code=``) for every load inside the block:
    the engine sets it from the plan, ``check_trained`` from its argument. Outside any block it is "no"."""
    previous = _consent[0]
    _consent[0] = bool(trusted)
    try:
        yield
    finally:
        _consent[0] = previous


def remote_code_allowed() -> bool:
    """Whether the run in progress may execute code shipped in a model directory."""
    return _consent[0]


def refuse_untrusted_code(model_dir: Path, trusted: bool) -> None:
    """``UntrustedCode`` (one line naming the files) when ``model_dir`` ships code and ``trusted`` is False:
    checked here, before transformers sees the directory, so no loader can run code the user did not allow."""
    if not trusted:
        from harness.inputs.code import require_trust

        require_trust({"model": Path(model_dir)}, False)


def trust_code_dirs(dirs: list[Path]) -> None:
    """Remember the model directories whose code runs, so frames in them count as model code."""
    for directory in dirs:
        resolved = Path(directory).resolve()
        if resolved not in _code_dirs:
            _code_dirs.append(resolved)


def is_model_code(filename: str) -> bool:
    if _MODULES_MARKER in filename:
        return True
    try:
        path = Path(filename).resolve()
    except (OSError, RuntimeError):
        return False
    return path.suffix == ".py" and any(path.parent == d for d in _code_dirs)


def _describe(filename: str, lineno: int) -> str:
    """``<code dir>/<file>.py:<line>`` for a frame in model code (the copy in the module cache is named by
    the directory it came from, when that directory is known)."""
    name = Path(filename).name
    for directory in _code_dirs:
        if (directory / name).is_file():
            return f"{directory / name}:{lineno}"
    return f"{filename}:{lineno}"


def model_code_frame(where: TracebackType | FrameType | None) -> str | None:
    """The innermost frame of a traceback (or stack) that is in model code, as ``file:line``; else None."""
    if isinstance(where, TracebackType):
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(where)]
    elif where is not None:
        frames = [(f.filename, f.lineno) for f in traceback.extract_stack(where)]
    else:
        return None
    for filename, lineno in reversed(frames):
        if is_model_code(filename):
            return _describe(filename, lineno or 0)
    return None


def model_code_frame_in_text(text: str) -> str | None:
    """The innermost model-code frame in a Python or faulthandler traceback printed as text."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith('File "'):
            continue
        filename = line[len('File "'):].split('"', 1)[0]
        rest = line.split('", line ', 1)[1] if '", line ' in line else ""
        digits = "".join(c for c in rest.split(" ", 1)[0].rstrip(",") if c.isdigit())
        if is_model_code(filename):
            # faulthandler lists the innermost frame first, Python tracebacks last
            spot = _describe(filename, int(digits or 0))
            if "Current thread" in text or "Thread 0x" in text:
                return found or spot
            found = spot
    return found


class NetworkBlocked(ConnectionError):
    """Raised instead of any network connection during a run (a ConnectionError, so libraries that fall back
    to their local cache when offline still do)."""


@dataclass
class NetworkAttempt:
    target: str
    where: str | None  # the model-code frame that asked, if any


_attempts: list[NetworkAttempt] = []


def network_attempts(since: int = 0) -> list[NetworkAttempt]:
    return list(_attempts[since:])


def _blocked(target) -> None:
    frame = sys._getframe(2)
    if isinstance(target, tuple) and len(target) >= 2:
        target = f"{target[0]}:{target[1]}"
    _attempts.append(NetworkAttempt(str(target)[:200], model_code_frame(frame)))
    raise NetworkBlocked(f"network access is disabled while plora-harness checks a model (asked for {target})")


@contextlib.contextmanager
def network_blocked():
    """Refuse every outgoing connection (and DNS lookup) until the block exits; record who asked."""
    originals = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)

    def connect(self, address, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None):
            return originals[0](self, address, *args, **kwargs)  # local sockets: not the network
        _blocked(address)

    def connect_ex(self, address, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None):
            return originals[1](self, address, *args, **kwargs)
        _blocked(address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.create_connection = lambda address, *a, **k: _blocked(address)
    socket.getaddrinfo = lambda host, *a, **k: _blocked(host)
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = originals


_HUB_WORDS = ("offlinemodeisenabled", "localentrynotfound", "couldn't connect", "could not connect", "hf_hub_offline",
              "offline mode", "cannot reach https://huggingface.co", "is not a local folder and is not a valid model")


def explain_build_failure(err: BaseException, model_dir: Path, since: int = 0):
    """An ``UnusableInput`` when ``err`` (raised while building the model from ``model_dir``) comes from the
    model's own code reaching the network or the hub, which a harness run cannot allow; else None."""
    from harness.inputs.errors import UnusableInput

    attempts = [a for a in network_attempts(since) if a.where]
    if attempts:
        first = attempts[0]
        return UnusableInput(
            f"{first.where}: the model code reaches the network ({first.target}) while the model is built, and "
            "plora-harness checks offline; ship that file inside the model directory and read it from there")
    chain, text = err, ""
    while chain is not None:
        text += f" {type(chain).__name__}: {chain}"
        chain = chain.__cause__ or chain.__context__
    if not any(word in text.lower() for word in _HUB_WORDS):
        return None
    where = model_code_frame(err.__traceback__)
    if where is None:
        return None
    repo = _requested_name(err)
    local = ""
    if repo is not None and not Path(repo).is_absolute():
        local = (f"; '{repo}' is not a directory relative to the current directory {Path.cwd()} either (run from the "
                 "directory the code expects, or make the path absolute)")
    what = f"'{repo}'" if repo else "a file"
    return UnusableInput(
        f"{where}: the model code downloads {what} from the Hugging Face hub while the model is built, and "
        f"plora-harness checks offline{local}; download it into the local hub cache first "
        "(`huggingface-cli download <repo>`) or point the code at a local copy")


_NAME_LOCALS = ("pretrained_model_name_or_path", "path_or_repo_id", "repo_id")


def _requested_name(err: BaseException) -> str | None:
    """What the model code asked to load: the repo id / path the library was called with, read from the
    first library frame below the model code's frame (robust to every version's wording)."""
    tb, seen_model_code = err.__traceback__, False
    while tb is not None:
        frame = tb.tb_frame
        if is_model_code(frame.f_code.co_filename):
            seen_model_code = True
        elif seen_model_code:
            for name in _NAME_LOCALS:
                value = frame.f_locals.get(name)
                if isinstance(value, (str, Path)):
                    return str(value)
        tb = tb.tb_next
    return None


@contextlib.contextmanager
def building_model(model_dir: Path):
    """Around code that builds a model from ``model_dir``: a failure caused by the model code needing the
    network becomes an ``UnusableInput`` (one line, file and line, the fix)."""
    since = len(_attempts)
    try:
        yield
    except Exception as err:
        unusable = explain_build_failure(err, Path(model_dir), since)
        if unusable is not None:
            raise unusable from None
        raise
