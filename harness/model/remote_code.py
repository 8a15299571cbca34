"""Known quirks of the real InternLM-XComposer2 remote code, detected and explained, never patched.

The real model directories (IXC2, 4KHD, 2.5) run their own ``*.py`` with ``trust_remote_code``,
written for transformers 4.33 (README: The real XComposer remote code). What breaks, and how it shows:

- ``attn_implementation`` defaults to ``flash_attention_2``: the load fails without flash-attn
  (and flash attention does not run on CPU). The harness asks for ``eager`` and says so.
- The CLIP tower (and on 2.5 a font) is fetched from the hub inside ``__init__``: offline, or
  with an empty cache, the load fails deep in transformers. Found here by reading the code and
  config (``ast``, nothing executed) and checking the local Hugging Face cache.
- ``im_mask=None`` crashes older HD PLoRA forwards; a model that ignores ``im_mask`` never runs
  PLoRA at all. Found by calling the loaded model on a few tokens.
- ``chat()``/``interleav_wrap`` read ``self.tokenizer``, which ``from_pretrained`` never sets.
- transformers 5.x leaves the rotary ``inv_freq``/``cos_cached`` buffers uninitialised on load:
  logits are NaN with no error.

Each finding is a ``Quirk`` whose ``sentence()`` is one line: the file, what is wrong, the fix.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.compat import FLASH_ATTENTION, flash_attn_installed
from harness.inputs.errors import InputError
from harness.inputs.files import read_json_object
from harness.model import families

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MIME_PREFIXES = {"image", "text", "application", "audio", "video", "multipart", "font"}
_DOWNLOAD_CALLS = {"from_pretrained", "hf_hub_download", "snapshot_download", "cached_file", "cached_path"}
_URL_CALLS = {"urlopen", "urlretrieve", "download_url"}  # plus requests.get / httpx.get, matched by object name
_HTTP_MODULES = {"requests", "httpx"}
_VISION_CONFIG_KEYS = ("vision_tower", "vit_path", "vit_model", "clip", "mm_vision", "visual_encoder", "image_encoder")
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


class RealModelError(RuntimeError):
    """The real model cannot be loaded or checked; ``str()`` is one sentence (file, problem, fix)."""

    def __init__(self, message: str, quirks: list[Quirk] | None = None) -> None:
        super().__init__(message)
        self.quirks = list(quirks or [])


# ---------------------------------------------------------------------------------------------
# Static: config.json and the remote-code files, read but never executed


def diagnose_dir(model_dir: str | Path) -> list[Quirk]:
    """Quirks visible without running anything: config, auto_map, attention, hub downloads, tokenizer."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return [Quirk("no-config", "error", str(config_path), "there is no config.json",
                      "pass the model directory itself (the one holding config.json and the *.py files)")]
    try:
        config = read_json_object(config_path)
    except InputError as err:
        return [Quirk("no-config", "error", str(config_path), f"it cannot be read ({err})",
                      "re-download the model directory")]
    if not isinstance(config, dict):
        return [Quirk("no-config", "error", str(config_path), "it is not a JSON object", "re-download the model directory")]
    quirks = _auto_map_quirks(model_dir, config)
    quirks += _attention_quirks(config_path, config)
    sources = _parse_sources(model_dir)
    quirks += _hub_quirks(model_dir, config_path, config, sources)
    quirks += _url_quirks(sources)
    quirks += _tokenizer_quirks(sources)
    # Rotary buffers are not judged from the code (a register_buffer says nothing about whether the loader
    # fills it): the engine compares them with what the constructor computes, and diagnose_loaded explains NaN.
    return quirks


def _auto_map_quirks(model_dir: Path, config: dict) -> list[Quirk]:
    where = str(model_dir / "config.json")
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        return [Quirk("no-remote-code", "error", where, "it has no auto_map, so this is not an XComposer2 remote-code "
                      "directory", "pass the directory downloaded from the hub, with its config.json and *.py files")]
    quirks = []
    if "AutoModelForCausalLM" not in auto_map:
        target = auto_map.get("AutoModel", "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM")
        quirks.append(Quirk("auto-map", "error", where, "auto_map has no AutoModelForCausalLM entry, which "
                            "AutoModelForCausalLM, PEFT and the merge script need",
                            f'add "AutoModelForCausalLM": "{target}" to auto_map'))
    for key, value in sorted(auto_map.items()):
        reference = value[0] if isinstance(value, list) and value else value
        if not isinstance(reference, str) or "--" in reference:  # "repo--module.Class": code from another repo
            continue
        module_file = reference.rsplit(".", 1)[0] + ".py"
        if not (model_dir / module_file).is_file():
            quirks.append(Quirk("auto-map", "error", where, f"auto_map[{key!r}] names {module_file}, which is not in "
                                "the directory", f"copy {module_file} from the original model directory"))
    return quirks


def _attention_quirks(config_path: Path, config: dict) -> list[Quirk]:
    asked = config.get("attn_implementation") or config.get("_attn_implementation")
    if asked not in FLASH_ATTENTION:
        return []
    installed = flash_attn_installed()
    problem = f"attn_implementation is {asked!r}" + ("" if installed else " and flash_attn is not installed, so a "
                                                     "plain from_pretrained fails")
    fix = ("the harness loads it with attn_implementation='eager' instead; in your own code pass "
           "attn_implementation='eager' to from_pretrained and set config.attn_implementation='eager'"
           + ("" if installed else ", or install flash-attn (CUDA only)"))
    return [Quirk("flash-attention", "note" if installed else "warning", str(config_path), problem, fix)]


@dataclass
class _Source:
    path: Path
    tree: ast.Module | None
    text: str
    error: str | None = None


def _parse_sources(model_dir: Path) -> list[_Source]:
    sources = []
    for path in sorted(model_dir.glob("*.py")):
        try:
            if path.stat().st_size > _MAX_CODE_BYTES:
                sources.append(_Source(path, None, "", "too large to read"))
                continue
            text = path.read_text(errors="replace")
            sources.append(_Source(path, ast.parse(text, filename=str(path)), text))
        except (OSError, SyntaxError, ValueError) as err:
            sources.append(_Source(path, None, "", f"{type(err).__name__}: {err}"))
    return sources


def _hub_ids_in_code(source: _Source) -> list[tuple[int, str]]:
    """String literals that look like hub repo ids, in a file that calls a download function."""
    if source.tree is None:
        return []
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for node in ast.walk(source.tree) if isinstance(node, ast.Call)}
    if not calls & _DOWNLOAD_CALLS:
        return []
    found = []
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _looks_like_hub_id(node.value):
            found.append((node.lineno, node.value))
    return found


def _looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and value.split("/", 1)[0].lower() not in _MIME_PREFIXES \
        and not value.endswith((".py", ".json", ".txt", ".md"))


def _hub_ids_in_config(config: dict, prefix: str = "") -> list[tuple[str, str]]:
    found = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _hub_ids_in_config(value, f"{name}.")
        elif isinstance(value, str) and any(k in key.lower() for k in _VISION_CONFIG_KEYS) and _looks_like_hub_id(value):
            found.append((name, value))
    return found


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (no network)."""
    snapshots = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps snapshots: read from the environment now, as the hub client would at start."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - very old huggingface_hub: its default location
        return Path.home() / ".cache" / "huggingface" / "hub"


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_quirks(model_dir: Path, config_path: Path, config: dict, sources: list[_Source]) -> list[Quirk]:
    places: dict[str, str] = {}
    for key, value in _hub_ids_in_config(config):
        if not (model_dir / value).exists():
            places.setdefault(value, f"{config_path} ({key})")
    for source in sources:
        for line, value in _hub_ids_in_code(source):
            if not (model_dir / value).exists():
                places.setdefault(value, f"{source.path}:{line}")
    quirks = []
    for repo_id, where in places.items():
        download = f"huggingface-cli download {repo_id}"
        if hub_cached(repo_id):
            quirks.append(Quirk("hub-download", "note", where, f"the model fetches {repo_id!r} from the Hugging Face "
                                "hub while it is built; it is in the local cache", "nothing to do on this machine"))
        elif hub_offline():
            quirks.append(Quirk("hub-download", "error", where, f"the model fetches {repo_id!r} from the Hugging Face "
                                "hub while it is built, the hub is switched off (HF_HUB_OFFLINE) and it is not in "
                                "the local cache", f"run `{download}` on a machine with access and copy the cache "
                                "here, or point this entry at a local copy"))
        else:
            quirks.append(Quirk("hub-download", "warning", where, f"the model fetches {repo_id!r} from the Hugging "
                                "Face hub while it is built and it is not in the local cache, so loading needs the "
                                "network", f"run `{download}` once, or point this entry at a local copy"))
    return quirks


def _url_quirks(sources: list[_Source]) -> list[Quirk]:
    """http(s) URLs fetched by the remote code itself (IXC2.5's ``get_font()`` downloads SimHei.ttf with
    ``urlopen`` from ``__init__``): the model cannot even be built without network access."""
    quirks = []
    for source in sources:
        if source.tree is None:
            continue
        fetches = any(
            isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id in _URL_CALLS)
                or (isinstance(node.func, ast.Attribute) and (node.func.attr in _URL_CALLS or (
                    isinstance(node.func.value, ast.Name) and node.func.value.id in _HTTP_MODULES))))
            for node in ast.walk(source.tree))
        if not fetches:
            continue
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(
                    ("http://", "https://")):
                offline = hub_offline()
                quirks.append(Quirk(
                    "url-download", "error" if offline else "warning", f"{source.path}:{node.lineno}",
                    f"the remote code downloads {node.value} itself"
                    + (" and the network is switched off (HF_HUB_OFFLINE)" if offline else
                       ", so building the model needs network access"),
                    "download the file once, put it in the model directory and point the code at it (or load "
                    "where the URL is reachable)"))
    return quirks


def _tokenizer_quirks(sources: list[_Source]) -> list[Quirk]:
    for source in sources:
        if source.tree is None:
            continue
        for node in ast.walk(source.tree):
            if (isinstance(node, ast.Attribute) and node.attr == "tokenizer" and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                return [Quirk("tokenizer-attribute", "note", f"{source.path}:{node.lineno}",
                              "the model's own prompt helpers (chat, interleav_wrap) read self.tokenizer, which "
                              "from_pretrained never sets (AttributeError or None)",
                              "set model.tokenizer = AutoTokenizer.from_pretrained(<model dir>, "
                              "trust_remote_code=True) before calling them; the harness builds its prompts itself")]
    return []


def _rotary_buffer_quirks(sources: list[_Source]) -> list[Quirk]:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return []
    for source in sources:
        match = re.search(r"register_buffer\(\s*['\"](inv_freq|cos_cached|sin_cached)['\"]", source.text)
        if match:
            line = source.text[:match.start()].count("\n") + 1
            return [Quirk("rotary-buffers", "warning", f"{source.path}:{line}",
                          f"transformers {transformers.__version__} does not initialise the remote code's rotary "
                          f"buffer {match.group(1)!r} on load, so logits come out NaN without an error",
                          "run the real model on transformers 4.x (4.46 to 4.57 with attn_implementation='eager', "
                          "or 4.33 as its fine-tuning README pins)")]
    return []


# ---------------------------------------------------------------------------------------------
# Behavioural: a few tokens through the loaded model


def buffer_definition(model_dir: str | Path, name: str) -> str | None:
    """``file:line`` of the ``register_buffer("<name>", ...)`` call in the model's code, if there is one."""
    pattern = re.compile(rf"register_buffer\(\s*['\"]{re.escape(name)}['\"]")
    for source in _parse_sources(Path(model_dir)):
        match = pattern.search(source.text)
        if match:
            return f"{source.path}:{source.text[:match.start()].count(chr(10)) + 1}"
    return None


def _plora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if families.is_branch_module(m)]


def code_location(err: BaseException, model_dir: Path) -> str:
    """``<model_dir>/<file>:<line>`` of the innermost frame of ``err`` in the model's own code."""
    local = {p.name for p in Path(model_dir).glob("*.py")}
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = Path(frame.filename).name
        if name in local:
            return f"{Path(model_dir) / name}:{frame.lineno}"
    return str(model_dir)


def model_source(model: torch.nn.Module, model_dir: Path) -> str:
    try:
        return str(Path(model_dir) / Path(inspect.getsourcefile(type(model)) or "").name)
    except TypeError:
        return str(model_dir)


@torch.no_grad()
def diagnose_loaded(model: torch.nn.Module, model_dir: str | Path) -> list[Quirk]:
    """Quirks that show only when the model runs: PLoRA present, ``im_mask=None``, ``im_mask`` honoured, finite."""
    model_dir = Path(model_dir)
    where = model_source(model, model_dir)
    plora = _plora_modules(model)
    if not plora:
        return [Quirk("no-plora", "error", where, "the model has no PLoRA modules (Plora_A/Plora_B), so it is not an "
                      "InternLM-XComposer2 model", "pass an IXC2 / IXC2-4KHD / IXC2.5 model directory")]
    quirks = []
    param = next(model.parameters())
    name, module = plora[0]
    x = torch.zeros(1, 2, module.in_features, device=param.device, dtype=param.dtype)
    try:
        module(x, None)
    except Exception as err:  # noqa: BLE001 - any failure here is the quirk
        quirks.append(Quirk("im-mask-none", "warning", code_location(err, model_dir),
                            f"PLoRA ({name}) fails with im_mask=None ({type(err).__name__}: {str(err)[:120]})",
                            "always pass a bool im_mask (all False for text-only input); the harness does"))
    embedding = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    scale = embedding.weight[:4096].float().pow(2).mean().sqrt().cpu()  # a slice: the full table is 1.5 GB in fp32
    embeds = torch.randn(1, 4, embedding.weight.shape[1], generator=gen) * scale
    embeds = embeds.to(param.device, param.dtype)
    outputs = {}
    for flag in (False, True):
        mask = torch.full((1, 4), flag, dtype=torch.bool, device=param.device)
        try:
            outputs[flag] = model(inputs_embeds=embeds, im_mask=mask, use_cache=False).logits.float()
        except TypeError as err:
            return quirks + [Quirk("im-mask-refused", "error", code_location(err, model_dir),
                                   f"the model's forward does not take the im_mask keyword ({err})",
                                   "use the XComposer2 remote code, whose forward passes im_mask to PLoRA")]
    if not all(torch.isfinite(v).all() for v in outputs.values()):
        transformers_5 = _rotary_buffer_quirks(_parse_sources(model_dir))
        why = (" (" + transformers_5[0].problem + ")") if transformers_5 else ""
        return quirks + [Quirk("non-finite", "error", where, f"the freshly loaded model returns NaN/inf logits{why}",
                               transformers_5[0].fix if transformers_5 else
                               "check the weights files (the finite check) and the dtype; load in float32 to compare")]
    if torch.equal(outputs[False], outputs[True]):
        quirks.append(Quirk("im-mask-ignored", "error", where, "the model's forward ignores im_mask: outputs with every "
                            "row marked as image equal those with none, so PLoRA never acts (or every Plora_B is zero)",
                            "use the XComposer2 remote code that passes im_mask down to its PLoRA layers"))
    return quirks


# ---------------------------------------------------------------------------------------------
# Load failures, explained


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
