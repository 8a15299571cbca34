"""Load failures of a model's own remote code, explained in one sentence; where its buffers are defined.

Used by the dynamic run when a base fails to load (``explain_load_error``: file, problem, fix, for the
known failures of the real InternLM-XComposer2 code on today's stacks) and when a loaded buffer differs
from the constructor's (``buffer_definition``). The code is read (``ast``), never executed here. The
diagnosis of a real model directory before a GPU run (hub downloads, flash attention, tokenizer, rotary
buffers) is test tooling: ``fixtures/gpu/quirks.py``.
"""

from __future__ import annotations

import ast
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

_MAX_CODE_BYTES = 4_000_000


@dataclass(frozen=True)
class Quirk:
    """One finding. ``severity``: "error" (the suite cannot run), "warning" (it runs; users hit this), "note"."""

    id: str
    severity: str
    where: str  # a file of the model directory, with ":line" when known
    problem: str
    fix: str

    def sentence(self) -> str:
        return f"{self.where}: {self.problem}; fix: {self.fix}"


@dataclass
class Source:
    """One code file of a model directory: its syntax tree (None when unreadable) and text."""

    path: Path
    tree: ast.Module | None
    text: str
    error: str | None = None


def parse_sources(model_dir: Path) -> list[Source]:
    """Every ``*.py`` of the directory, read and parsed (never executed); a file that cannot be is kept with why."""
    sources = []
    for path in sorted(model_dir.glob("*.py")):
        try:
            if path.stat().st_size > _MAX_CODE_BYTES:
                sources.append(Source(path, None, "", "too large to read"))
                continue
            text = path.read_text(errors="replace")
            sources.append(Source(path, ast.parse(text, filename=str(path)), text))
        except (OSError, SyntaxError, ValueError) as err:
            sources.append(Source(path, None, "", f"{type(err).__name__}: {err}"))
    return sources


def buffer_definition(model_dir: str | Path, name: str) -> str | None:
    """``file:line`` of the ``register_buffer("<name>", ...)`` call in the model's code, if there is one."""
    pattern = re.compile(rf"register_buffer\(\s*['\"]{re.escape(name)}['\"]")
    for source in parse_sources(Path(model_dir)):
        match = pattern.search(source.text)
        if match:
            return f"{source.path}:{source.text[:match.start()].count(chr(10)) + 1}"
    return None


def code_location(err: BaseException, model_dir: Path) -> str:
    """``<model_dir>/<file>:<line>`` of the innermost frame of ``err`` in the model's own code."""
    local = {p.name for p in Path(model_dir).glob("*.py")}
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = Path(frame.filename).name
        if name in local:
            return f"{Path(model_dir) / name}:{frame.lineno}"
    return str(model_dir)


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def explain_load_error(err: BaseException, model_dir: str | Path) -> str:
    """One sentence (file, problem, fix) for an exception raised while loading the real model."""
    model_dir = Path(model_dir)
    text = f"{type(err).__name__}: {err}"
    first = text.splitlines()[0][:240]
    where = code_location(err, model_dir)
    if "flash_attn" in text or ("flash_attention" in text.lower() and "not" in text.lower()):
        return Quirk("flash-attention", "error", str(model_dir / "config.json"),
                     f"the model asks for flash attention and loading failed ({first})",
                     "load with attn_implementation='eager' (the harness does) or install flash-attn").sentence()
    if isinstance(err, ModuleNotFoundError) and getattr(err, "name", None) and "transformers_modules" not in err.name:
        package = err.name.split(".")[0]
        return Quirk("missing-package", "error", where, f"the remote code imports {package!r}, which is not installed",
                     f"pip install {package} (the real code also needs einops, torchvision, decord and pillow)").sentence()
    hub_ids = [h.rstrip(".") for h in re.findall(r"(?<![\w./:-])([A-Za-z0-9][\w.-]*/[\w.-]*[\w-])", text)]
    hub_words = ("huggingface.co", "offline", "LocalEntryNotFound", "couldn't connect", "ConnectionError")
    if hub_ids and any(w.lower() in text.lower() for w in hub_words):
        repo = hub_ids[-1]
        return Quirk("hub-download", "error", where, f"the model tried to fetch {repo!r} from the Hugging Face hub "
                     f"while it was built and could not ({first})",
                     f"run `huggingface-cli download {repo}` on a machine with access, or point the code at a "
                     "local copy").sentence()
    if "meta device context manager" in text or "set_default_device('meta')" in text:
        return Quirk("from-pretrained-in-init", "error", where, "the model code calls from_pretrained inside its "
                     f"__init__, which transformers {transformers_version()} refuses while it builds a model",
                     "load this model with transformers 4.x (its code was written for 4.33), or build that part "
                     "from a config in __init__").sentence()
    if isinstance(err, KeyError) and "type" in str(err):
        return Quirk("rope-scaling", "error", where, f"the remote code cannot read rope_scaling ({first}); "
                     "transformers 5.x turns rope_scaling=None into a dict without 'type'",
                     "run the real model on transformers 4.x (4.46 to 4.57, or 4.33)").sentence()
    return Quirk("load-failed", "error", where, f"loading failed ({first})",
                 "load it yourself with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) to see the "
                 "full traceback").sentence()
