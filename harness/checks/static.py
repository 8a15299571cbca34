"""Static checks: read the adapter directory only, load no model.

``config-valid``, ``weights-readable``, ``unsafe-pickle``, ``empty-tensors``, ``key-grammar``,
``shapes``, ``finite``, ``noop``, ``full-checkpoint``. ``finite``, ``noop`` and ``empty-tensors``
share one streaming pass over the tensor data (``AdapterInputs.scan``, cached on the context).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, NamedTuple

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.model.lora_math import module_rank
from harness.model.peft_keys import KeyAnalysis, analyse, as_list

if TYPE_CHECKING:
    from harness.inputs.adapter_dir import AdapterInputs
    from harness.inputs.weights import WeightFile
    from harness.model.structure import BaseModelInfo

B_KINDS = ("lora_B", "lora_embedding_B")
REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha")
ZERO3_FIX = (
    "save under ZeRO-3 only after gathering: wrap save_pretrained in "
    "deepspeed.zero.GatheredParameters(params, modifier_rank=None) on all ranks, or pass "
    "state_dict=engine._zero3_consolidated_16bit_state_dict() to save_pretrained"
)


# -- shared analysis -------------------------------------------------------------------------------


def _config(ctx: CheckContext) -> dict:
    config = ctx.adapter.config if ctx.adapter is not None else None
    return config if isinstance(config, dict) else {}


def analyse_keys(ctx: CheckContext) -> KeyAnalysis:
    def compute() -> KeyAnalysis:
        config = _config(ctx)
        return analyse(ctx.adapter.tensors, config)

    return ctx.cached("static.keys", compute, name="classifying the adapter's keys")


def tensor_scan(ctx: CheckContext):
    """The one streaming pass (finite / all-zero / empty), shared by every data check."""
    return ctx.cached("static.scan", ctx.adapter.scan, name="scanning the adapter's tensors (finite, zero, empty)")


def full_checkpoint_reason(ctx: CheckContext) -> str | None:
    """Why the input is a full model / merged checkpoint rather than an adapter, or None."""

    def compute() -> str | None:
        adapter: AdapterInputs = ctx.adapter
        names = ", ".join(wf.name for wf in adapter.foreign_files[:3])
        if adapter.foreign_files and adapter.model_config is not None and adapter.config_path is None:
            return (
                f"a full model directory (config.json + {names}) with no adapter_config.json: "
                f"a merged or base model, not an adapter"
            )
        keys = analyse_keys(ctx)
        total = len(keys.infos)
        if total == 0:
            return None
        base_layer = keys.of("base_layer")
        if base_layer:
            return (
                f"{len(base_layer)} of {total} keys are base weights (e.g. {base_layer[0].key}): a full "
                f"PeftModel state_dict(), not the adapter save_pretrained writes"
            )
        lora = keys.lora
        unknown = keys.of("unknown", "branch")
        if not lora and unknown:
            return (
                f"none of the {total} keys is a LoRA tensor (e.g. {unknown[0].key}): a full or merged model "
                f"state dict, not an adapter"
            )
        if lora and len(unknown) > len(lora):
            return (
                f"{len(unknown)} of {total} keys are not LoRA tensors (e.g. {unknown[0].key}): a model "
                f"state dict with LoRA tensors inside, not an adapter"
            )
        if adapter.foreign_files and not adapter.adapter_files:
            return f"only model weight files ({names}), no adapter_model.safetensors/.bin"
        return None

    return ctx.cached("static.full_checkpoint", compute, name="telling an adapter from a full checkpoint")


def _data_unavailable(ctx: CheckContext) -> str | None:
    """A skip reason when the tensor checks have nothing adapter-like to read."""
    adapter: AdapterInputs = ctx.adapter
    if adapter is None:
        return "no adapter given"
    primary = adapter.primary
    if primary is None:
        return "no readable weights file (see weights-readable)"
    if primary.role == "foreign" or full_checkpoint_reason(ctx):
        return "not an adapter (see full-checkpoint)"
    return None


def _examples(items, limit: int = 5) -> list:
    return list(items)[:limit]


def _more(count: int, limit: int = 3) -> str:
    return f" (+{count - limit} more)" if count > limit else ""


# -- config-valid ----------------------------------------------------------------------------------


# Fields that describe the file, not the adapter's behaviour: unknown to an older PEFT, dropped harmlessly.
METADATA_FIELDS = frozenset({"peft_version", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode"})


def _default_looking(value) -> bool:
    """None, False, "", empty containers, or a dict of such values (e.g. ``runtime_config``)."""
    if isinstance(value, dict):
        return all(_default_looking(v) for v in value.values())
    return value is None or value is False or value == "" or (isinstance(value, list) and not value)


def _rejected(installed: str, err: Exception):
    text = str(err).strip().splitlines()
    return failed(
        f"PEFT {installed} rejects this config: {text[0][:200] if text else type(err).__name__}",
        exception=type(err).__name__,
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_RANK = 65_536  # no LoRA rank is larger (the widest hidden sizes are about 16k)
MAX_ALPHA = 1_000_000.0  # alpha / r beyond this swamps any base weight
# Module names to time config regexes on when the adapter's own tensors cannot be read: typical of the towers.
PROBE_NAMES = ("model.layers.0.attention.wqkv", "model.layers.0.self_attn.q_proj", "model.layers.31.mlp.down_proj",
               "vit.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj", "lm_head")


def _rank_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be a LoRA rank (``r`` or a rank_pattern value), or None."""
    if type(value) is not int or value <= 0:
        return f"{name} must be a positive integer, not {_shown(value)}"
    if value > MAX_RANK:
        return f"{name} is {_shown(value)}, over {MAX_RANK:,}: no LoRA rank is that large"
    return None


def _alpha_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be a LoRA alpha (``lora_alpha`` or an alpha_pattern value), or None."""
    if not _is_number(value):
        return f"{name} must be a number, not {_shown(value)}"
    if not math.isfinite(value):
        return f"{name} is {value}, not a finite number"
    if value == 0:
        return f"{name} is 0: the LoRA scaling is zero, the adapter does nothing"
    if value < 0:
        return f"{name} is negative ({_shown(value)}): the LoRA scaling alpha/r must be positive"
    if value > MAX_ALPHA:
        return f"{name} is {_shown(value)}, over {MAX_ALPHA:,.0f}: the scaling alpha/r would swamp the base weights"
    return None


class ConfigProblem(NamedTuple):
    """One thing wrong in adapter_config.json: the field, the sentence, and whether it is a regex PEFT would build
    (which decides the fix: a simpler pattern, not a regenerated config)."""

    field: str
    text: str
    regex: bool = False


def _scalar_problems(config: dict) -> list[ConfigProblem]:
    """r, lora_alpha, target_modules, bias, rank_pattern and alpha_pattern: types and ranges."""
    found = [("r", _rank_problem("r", config.get("r"))), ("lora_alpha", _alpha_problem("lora_alpha", config.get("lora_alpha")))]
    targets = config.get("target_modules")
    if targets is not None and not (
        (isinstance(targets, str) and targets) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        found.append(("target_modules",
                      f"target_modules must be a non-empty list of names or a regex string, not {_shown(targets)}"))
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        found.append(("bias", f"bias must be 'none', 'all' or 'lora_only', not {_shown(config.get('bias'))}"))
    for name, judge in (("rank_pattern", _rank_problem), ("alpha_pattern", _alpha_problem)):
        table = config.get(name)
        if table is None:
            continue
        if not isinstance(table, dict):
            found.append((name, f"{name} must map module patterns to numbers, not {_shown(table)}"))
            continue
        found += [(name, judge(f"{name}[{_shown(key)}]", value)) for key, value in table.items()]
    return [ConfigProblem(name, text) for name, text in found if text]


def _pattern_problems(config: dict, names: list[str]) -> list[ConfigProblem]:
    """Every regex PEFT would build from the config, compiled as PEFT splices it, then timed on ``names``."""
    from harness.inputs.patterns import PatternTooCostly, bounded_matches, compile_problem, config_patterns

    found = []
    for pattern in config_patterns(config):
        problem = compile_problem(pattern)
        if problem is None:
            try:
                bounded_matches(pattern, names)
            except PatternTooCostly as err:
                problem = str(err)
        if problem is not None:
            found.append(ConfigProblem(pattern.field, problem, regex=True))
    return found


def _module_names(ctx: CheckContext) -> list[str]:
    """The adapter's LoRA module names (what PEFT matches the config's regexes against), plus typical names."""
    names = list(PROBE_NAMES)
    if ctx.adapter is not None and ctx.adapter.primary is not None:
        names += sorted({info.module for info in analyse_keys(ctx).lora if info.module})
    return names


def _unmatched_targets(ctx: CheckContext, config: dict) -> tuple[str, str] | None:
    """(message, fix) when ``target_modules`` is a regex that misses modules the adapter holds LoRA weights for.

    PEFT creates a LoRA layer only where ``re.fullmatch(target_modules, name)`` holds; the saved tensors of
    every other module become unexpected keys and are dropped with a warning (none loaded when it matches
    none). The adapter's own keys name those modules, so no base model is needed. Only the regex form: a list
    is matched by suffix and narrowed by layers_to_transform, and "all-linear" is a shorthand, not a regex.
    """
    from harness.inputs.patterns import ConfigPattern, PatternTooCostly, bounded_matches

    targets = config.get("target_modules")
    if not isinstance(targets, str) or targets == "all-linear" or config.get("target_parameters"):
        return None
    if ctx.adapter is None or ctx.adapter.primary is None:
        return None
    modules = sorted({i.module for i in analyse_keys(ctx).lora if i.module and i.prefixes == 1 and not i.adapter_name})
    if not modules:
        return None
    try:
        hits = set(bounded_matches(ConfigPattern("target_modules", targets, targets, "fullmatch"), modules))
    except (PatternTooCostly, re.error):  # reported by _pattern_problems
        return None
    missed = [m for m in modules if m not in hits]
    if not missed:
        return None
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})[:5]
    example = rf".*\.({'|'.join(re.escape(leaf) for leaf in leaves)})"
    fix = ("set target_modules to a regex that matches each trained module's full name (PEFT uses re.fullmatch, "
           f"e.g. {example}) or to the list of their names, as get_peft_model was given at training time")
    if not hits:
        return (f"adapter_config.json: target_modules regex {_shown(targets)} matches none of the {len(modules)} "
                f"module(s) the adapter holds LoRA weights for (e.g. {missed[0]}): PEFT would create no LoRA layer "
                "and load none of the adapter's tensors", fix)
    return (f"adapter_config.json: target_modules regex {_shown(targets)} misses {len(missed)} of the {len(modules)} "
            f"module(s) the adapter holds LoRA weights for (e.g. {missed[0]}): PEFT would drop their tensors and "
            "load the adapter only in part", fix)


def _config_fix(problems: list[ConfigProblem]) -> str:
    if any(problem.regex for problem in problems):
        return ("write target_modules as a list of module names, or a simple regex PEFT can match (no nested "
                "quantifiers such as (a+)+); rank_pattern / alpha_pattern keys are regexes too")
    return "regenerate adapter_config.json with save_pretrained, with r a positive integer and lora_alpha a " \
           "positive finite number"


def _shown(value, limit: int = 60) -> str:
    """A config value in a message: its repr, cut (a 10,000-digit number or a 1 MB string stays short)."""
    try:
        text = repr(value)
    except ValueError:  # an int too large for repr
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def check_config_valid(ctx: CheckContext):
    adapter: AdapterInputs = ctx.adapter
    if adapter.config is None:
        detail = {"error": adapter.config_error}
        if adapter.config_path is None and adapter.foreign_files:
            return failed(
                "no adapter_config.json: this directory is not a PEFT adapter (see full-checkpoint)",
                fix="pass the directory written by peft_model.save_pretrained(); for a merged model use --merged "
                "together with --base-model and --adapter",
                **detail,
            )
        return failed(
            adapter.config_error or "adapter_config.json missing",
            fix="copy the adapter_config.json written by save_pretrained next to the weights (PEFT cannot build "
            "the LoRA layers without it)",
            **detail,
        )

    config = adapter.config
    missing = [name for name in REQUIRED_FIELDS if config.get(name) is None]
    targets, params = config.get("target_modules"), config.get("target_parameters")
    if not targets and not params:
        missing.append("target_modules")
    if missing:
        return failed(
            f"adapter_config.json lacks required field(s): {', '.join(missing)}",
            fix="regenerate adapter_config.json with save_pretrained (it writes every field) instead of editing it by hand",
            missing=missing,
        )
    peft_type = config.get("peft_type")
    if isinstance(peft_type, str) and peft_type.upper() == "LORA" and peft_type != "LORA":
        return failed(
            f"peft_type is {_shown(peft_type)}, not exactly 'LORA': PeftConfig.from_pretrained cannot find its config "
            "class",
            fix='write "peft_type": "LORA" (upper case) in adapter_config.json',
            peft_type=peft_type,
        )
    if peft_type != "LORA":  # PEFT looks the type up by exact value
        return failed(
            f"peft_type is {_shown(peft_type)}: this harness checks LoRA adapters (peft_type LORA)",
            fix="use a LoRA adapter, or a tool made for this PEFT method",
            peft_type=peft_type,
        )

    r, alpha = config.get("r"), config.get("lora_alpha")
    problems = _scalar_problems(config) + _pattern_problems(config, _module_names(ctx))
    if problems:
        return failed(
            f"adapter_config.json: {problems[0].text}{_more(len(problems), 1)}",
            fix=_config_fix(problems),
            problems=[problem.text for problem in problems],
            fields=sorted({problem.field for problem in problems}),
        )

    from harness.compat import PEFT_VERSION, lora_config_fields

    known = lora_config_fields()
    unknown = {k: v for k, v in config.items() if k not in known}
    writer = config.get("peft_version")
    installed = str(PEFT_VERSION)
    origin = f"written by PEFT {writer}, " if writer else ""
    fix_version = (f"install peft>={writer} to load this adapter as trained" if writer else
                   "install the PEFT version that wrote this adapter")

    # Read the config the way the installed PEFT does (PeftModel.from_pretrained -> from_peft_type):
    # its own validation runs, and how it treats unknown fields is observed, not assumed.
    try:
        from peft import PeftConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftConfig.from_peft_type(**config)
    except TypeError as err:
        if unknown and "unexpected keyword argument" in str(err):
            return failed(
                f"PEFT {installed} cannot read this config: it raises TypeError on the field(s) it does not know: "
                f"{', '.join(sorted(unknown))} ({origin}PEFT before about 0.14 refuses unknown fields even at "
                f"default values)",
                fix=f"{fix_version}, or delete the unknown fields from a copy of adapter_config.json if they are all "
                "at their defaults",
                unknown_fields=unknown,
                peft_version_written=writer,
                peft_version_installed=installed,
            )
        return _rejected(installed, err)
    except Exception as err:  # noqa: BLE001
        return _rejected(installed, err)

    unmatched = _unmatched_targets(ctx, config)
    if unmatched is not None:
        message, fix = unmatched
        return failed(message, fix=fix, fields=["target_modules"])

    if unknown:
        non_default = {k: v for k, v in unknown.items() if k not in METADATA_FIELDS and not _default_looking(v)}
        names = ", ".join(sorted(unknown))
        if non_default:
            return failed(
                f"field(s) unknown to the installed PEFT {installed} with non-default values: "
                f"{', '.join(sorted(non_default))} ({origin}PEFT {installed} drops them silently, so the adapter "
                "would not behave as trained)",
                fix=fix_version,
                unknown_fields=unknown,
                peft_version_written=writer,
                peft_version_installed=installed,
            )
        return warned(
            f"field(s) unknown to the installed PEFT {installed}, all at default values: {names} "
            f"({origin}PEFT {installed} drops them with a warning: harmless here, but PEFT before about 0.14 "
            "raises TypeError on them)",
            fix="delete these fields from adapter_config.json for older PEFT versions, or upgrade peft",
            unknown_fields=unknown,
            peft_version_written=writer,
            peft_version_installed=installed,
        )
    return passed(
        f"LoRA config: r={r}, lora_alpha={alpha}, "
        f"{len(as_list(targets)) or len(as_list(params))} target pattern(s)"
        + (", rank_pattern" if config.get("rank_pattern") else "")
        + (", alpha_pattern" if config.get("alpha_pattern") else "")
        + (", rsLoRA" if config.get("use_rslora") else "")
        + (", DoRA" if config.get("use_dora") else ""),
        peft_version_written=writer,
        peft_version_installed=installed,
    )


register(
    id="config-valid",
    group="static",
    summary="adapter_config.json is missing, lacks required fields (peft_type, r, lora_alpha, target_modules), "
    "is not a LoRA config, has invalid values (or a target_modules regex that misses modules the adapter holds "
    "weights for), or has fields the installed PEFT does not know",
    why="PEFT builds the LoRA layers from this file: a missing field fails the load, and a field from a newer "
    "PEFT raises TypeError in older versions or is silently dropped in newer ones (changing the adapter's behaviour)",
    fix="regenerate adapter_config.json with save_pretrained, or install the PEFT version that wrote it "
    "(its peft_version field)",
)(check_config_valid)


# -- weights-readable ------------------------------------------------------------------------------


def _compare_files(first: WeightFile, second: WeightFile) -> list[str]:
    """Differences between two readable weights files (keys, shapes, dtypes, then bytes)."""
    import torch

    diffs: list[str] = []
    a_keys, b_keys = set(first.tensors), set(second.tensors)
    if a_keys - b_keys:
        diffs.append(f"{len(a_keys - b_keys)} key(s) only in {first.name}, e.g. {sorted(a_keys - b_keys)[0]}")
    if b_keys - a_keys:
        diffs.append(f"{len(b_keys - a_keys)} key(s) only in {second.name}, e.g. {sorted(b_keys - a_keys)[0]}")
    differing = []
    for key in sorted(a_keys & b_keys):
        ia, ib = first.tensors[key], second.tensors[key]
        if ia.shape != ib.shape or ia.dtype != ib.dtype:
            differing.append(f"{key} ({ia.dtype}{list(ia.shape)} vs {ib.dtype}{list(ib.shape)})")
            continue
        try:
            same = torch.equal(first.get_tensor(key), second.get_tensor(key))
        finally:
            first.release(key)
        if not same:
            differing.append(key)
    if differing:
        diffs.append(f"{len(differing)} tensor(s) differ, e.g. {differing[0]}")
    return diffs


def check_weights_readable(ctx: CheckContext):
    adapter: AdapterInputs = ctx.adapter
    files = adapter.adapter_files
    if not files:
        if adapter.foreign_files:
            names = ", ".join(wf.name for wf in adapter.foreign_files[:3])
            return failed(
                f"no adapter_model.safetensors or adapter_model.bin; found {names}{_more(len(adapter.foreign_files))} "
                f"(model weights, see full-checkpoint)",
                fix="pass the directory written by peft_model.save_pretrained()",
                found=[wf.name for wf in adapter.foreign_files],
            )
        return failed(
            f"no weights file in {adapter.root}: expected adapter_model.safetensors (or adapter_model.bin)",
            fix="copy the adapter weights next to adapter_config.json, or re-save with save_pretrained",
        )
    broken = [wf for wf in files if wf.error]
    if broken:
        first = broken[0]
        return failed(
            f"{first.name}: {first.error}" + (f" (and {len(broken) - 1} more file)" if len(broken) > 1 else ""),
            fix="see unsafe-pickle" if first.unsafe_globals else
            "re-save the adapter with save_pretrained(safe_serialization=True), or re-download it completely",
            errors={wf.name: wf.error for wf in broken},
        )
    empty_files = [wf for wf in files if not wf.tensors]
    if empty_files:
        return failed(
            f"{empty_files[0].name} holds no tensors",
            fix="the save wrote nothing: check that the model had LoRA layers and re-save with save_pretrained",
        )
    details = {wf.name: {"tensors": len(wf.tensors), "bytes": wf.size} for wf in files}
    if len(files) == 2:
        safetensors_file = next(wf for wf in files if wf.format == "safetensors")
        bin_file = next(wf for wf in files if wf.format == "bin")
        ctx.say("comparing adapter_model.bin with adapter_model.safetensors")
        diffs = _compare_files(safetensors_file, bin_file)
        if diffs:
            return failed(
                f"adapter_model.bin and adapter_model.safetensors differ: {diffs[0]}",
                fix="delete the stale file (PEFT loads adapter_model.safetensors when both exist) and keep one",
                differences=diffs,
                **details,
            )
        return passed(
            f"adapter_model.safetensors and adapter_model.bin are identical ({len(safetensors_file.tensors)} tensors)",
            **details,
        )
    wf = files[0]
    return passed(f"{wf.name}: {len(wf.tensors)} tensors, {wf.size} bytes, header sane", **details)


register(
    id="weights-readable",
    group="static",
    summary="no adapter weights, or a truncated / corrupt / hostile weights file, or both adapter_model.bin and "
    "adapter_model.safetensors present with different contents",
    why="a truncated download or a bad header fails the load (or worse, loads garbage); when both formats exist "
    "PEFT loads the safetensors one, so a stale .bin next to it is a trap for every other loader",
    fix="re-save the adapter with save_pretrained (or re-download it); keep exactly one weights file",
)(check_weights_readable)


# -- unsafe-pickle ---------------------------------------------------------------------------------


def check_unsafe_pickle(ctx: CheckContext):
    adapter: AdapterInputs = ctx.adapter
    bins = [wf for wf in adapter.weight_files if wf.format == "bin"]
    if not bins:
        return skipped("no .bin file (safetensors only)")
    unsafe = [wf for wf in bins if wf.unsafe_globals]
    if unsafe:
        wf = unsafe[0]
        globals_ = wf.unsafe_globals
        return failed(
            f"{wf.name} is a pickle that would call {', '.join(globals_[:3])}{_more(len(globals_))}; "
            f"refused and not executed",
            file=wf.name,
            unsafe_globals=globals_,
        )
    uninspected = [wf for wf in bins if wf.unsafe_globals is None]
    if uninspected:
        return skipped(f"{uninspected[0].name} could not be inspected: {uninspected[0].error} (see weights-readable)")
    names = ", ".join(wf.name for wf in bins)
    return passed(f"{names}: only torch tensor-rebuild globals, loaded with weights_only=True")


register(
    id="unsafe-pickle",
    group="static",
    summary="a .bin (pickle) weights file that needs Python objects beyond torch's tensor-rebuild allowlist",
    why="a .bin file is a pickle: loading it with torch.load(weights_only=False) (old transformers/PEFT, many "
    "scripts) runs whatever code it names; the harness only disassembles it and never executes it",
    fix="do not load this file with torch.load(weights_only=False); get a safetensors export, or re-save from a "
    "trusted environment with save_pretrained(safe_serialization=True)",
)(check_unsafe_pickle)


# -- empty-tensors ---------------------------------------------------------------------------------


def check_empty_tensors(ctx: CheckContext):
    reason = _data_unavailable(ctx)
    if reason:
        return skipped(reason)
    infos = ctx.adapter.tensors
    empty = [key for key, info in infos.items() if info.numel == 0]
    if empty:
        shapes = {key: list(infos[key].shape) for key in _examples(empty, 10)}
        return failed(
            f"{len(empty)} of {len(infos)} tensors are empty (e.g. {empty[0]} shape {tuple(infos[empty[0]].shape)}): "
            f"saved under ZeRO-3 without gathering the partitioned parameters",
            empty=len(empty),
            examples=shapes,
        )
    return passed(f"all {len(infos)} tensors have elements")


register(
    id="empty-tensors",
    group="static",
    summary="tensors with zero elements, e.g. lora_A of shape (0,): the symptom of save_pretrained under "
    "DeepSpeed ZeRO-3 without gathering the partitioned parameters",
    why="each rank holds only a shard of every parameter under ZeRO-3; saving without gathering writes "
    "placeholders, and loading the adapter fails or silently leaves the LoRA weights at initialisation",
    fix=ZERO3_FIX,
)(check_empty_tensors)


# -- key-grammar -----------------------------------------------------------------------------------


def check_key_grammar(ctx: CheckContext):
    adapter: AdapterInputs = ctx.adapter
    if adapter.primary is None:
        return skipped("no readable weights file (see weights-readable)")
    if adapter.primary.role == "foreign":
        return skipped("not an adapter (see full-checkpoint)")
    keys = analyse_keys(ctx)
    if not keys.infos:
        return skipped("no tensors")
    config = _config(ctx)
    problems: list[tuple[str, list[str], str]] = []  # (message, examples, fix)

    no_prefix = [i.key for i in keys.infos if i.prefixes == 0]
    doubled = [i.key for i in keys.infos if i.prefixes > 1]
    named = [i for i in keys.infos if i.adapter_name]
    plora = [i.key for i in keys.of("branch")]
    base = [i.key for i in keys.of("base_layer")]
    unknown = [i.key for i in keys.of("unknown")]
    if doubled:
        problems.append((
            f"{len(doubled)} key(s) carry the base_model.model. prefix {max(i.prefixes for i in keys.infos)} times "
            f"(e.g. {doubled[0]})",
            doubled,
            "the adapter was saved from a PeftModel wrapped twice (get_peft_model on a PeftModel); strip one "
            "'base_model.model.' or re-save from a singly wrapped model",
        ))
    if no_prefix:
        problems.append((
            f"{len(no_prefix)} key(s) lack the base_model.model. prefix (e.g. {no_prefix[0]})",
            no_prefix,
            "save with peft_model.save_pretrained(); PEFT expects keys like "
            "base_model.model.<module>.lora_A.weight",
        ))
    if named:
        names = sorted({i.adapter_name for i in named})
        problems.append((
            f"{len(named)} key(s) still contain the adapter name {names[0]!r} (e.g. {named[0].key})",
            [i.key for i in named],
            "save with peft_model.save_pretrained(), which strips the adapter name; or remove "
            f"'.{names[0]}' from the keys",
        ))
    if plora:
        problems.append((
            f"{len(plora)} key(s) are the base model's {keys.family.branch_label} weights, not LoRA tensors (e.g. "
            f"{plora[0]}){keys.family.branch_key_note}",
            plora,
            "save with peft_model.save_pretrained() (PEFT >= 0.21 selects adapter weights structurally), or select "
            "keys with '.lora_A.'/'.lora_B.' rather than 'lora_'",
        ))
    if base:
        problems.append((
            f"{len(base)} key(s) are base weights (base_layer/original_module, e.g. {base[0]})",
            base,
            "save with peft_model.save_pretrained(), not model.state_dict()",
        ))
    if unknown:
        problems.append((
            f"{len(unknown)} key(s) are not LoRA tensors PEFT knows (e.g. {unknown[0]})",
            unknown,
            "remove them, or list the fully trained modules in modules_to_save so PEFT restores them",
        ))
    magnitudes = [i for i in keys.lora if i.lora_kind == "lora_magnitude_vector"]
    if config.get("use_dora") and keys.lora and not magnitudes:
        problems.append((
            "use_dora is true but there is no lora_magnitude_vector: PEFT would re-initialise the DoRA magnitudes",
            [],
            "re-save with save_pretrained from the trained DoRA model",
        ))
    if not problems:
        counts = {}
        for info in keys.infos:
            counts[info.kind] = counts.get(info.kind, 0) + 1
        return passed(f"{len(keys.infos)} keys follow PEFT's adapter format", kinds=counts)
    message, examples, fix = problems[0]
    return failed(
        message + (f"; and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""),
        fix=fix,
        problems=[p[0] for p in problems],
        examples=_examples(examples, 5),
    )


register(
    id="key-grammar",
    group="static",
    summary="keys that PEFT will not match: the base_model.model. prefix missing or doubled, an adapter name "
    "(.default.) left in keys, base-model PLoRA weights saved as adapter tensors, unknown suffixes",
    why="PEFT loads adapters with strict=False and only warns: keys it cannot match are dropped and those "
    "LoRA layers stay at initialisation, so the adapter silently does less or nothing",
    fix="save with peft_model.save_pretrained() (which writes get_peft_model_state_dict()); do not save "
    "model.state_dict() or rename keys by hand",
)(check_key_grammar)


# -- shapes ----------------------------------------------------------------------------------------


def _module_shape_problem(config: dict, module: str,
                          parts: dict[str, tuple[int, ...]]) -> tuple[str | None, int | None]:
    """(what is inconsistent in one module's saved parts, its rank). The parts and the shape rule come from the
    layer-kind table; without the base, Linear and Conv1D are alike here ([r, in] / [out, r])."""
    from harness.model.layer_kinds import Dims, kind_of_parts

    kind = kind_of_parts(parts)
    a_name, b_name = kind.parts
    a, b = parts.get(a_name), parts.get(b_name)
    if a is None and b is None:
        return None, None
    if a is None or b is None:
        return (f"{module}: {a_name if a is not None else b_name} without "
                f"{b_name if a is not None else a_name}"), None
    if len(a) != 2 or len(b) != 2:
        return f"{module}: {a_name}{list(a)} / {b_name}{list(b)} are not matrices", None
    rank_a, rank_b = a[0], b[1]
    if rank_a != rank_b:
        return f"{module}: {a_name} rank {rank_a} ({list(a)}) != {b_name} rank {rank_b} ({list(b)})", None
    expected = module_rank(config, module) if config else None
    if expected is not None and rank_a != expected:
        source = "rank_pattern" if config.get("rank_pattern") and expected != config.get("r") else "r"
        return f"{module}: rank {rank_a} {list(a)}/{list(b)} but the config's {source} gives {expected}", None
    # from the saved parts alone: in = A's second dim, out = B's first (the table's rule, inverted)
    want = kind.lora_shapes(Dims(a[1], b[0]), rank_a)
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is not None and math.prod(magnitude) != b[0]:  # [out] (Linear), [1, out, 1, 1] (Conv)
        return f"{module}: lora_magnitude_vector {list(magnitude)} does not match {b_name} out {b[0]}", None
    bias = parts.get(f"{b_name}.bias")
    if bias is not None and tuple(bias) != want.get(f"{b_name}.bias"):
        why = "" if kind.lora_bias else f" (PEFT has no lora_bias for a {kind.module_type})"
        return f"{module}: {b_name}.bias {list(bias)} does not match {b_name} out {b[0]}{why}", None
    return None, rank_a


def tokens_shape_problem(base: BaseModelInfo | None, config: dict, module: str,
                         shape: tuple[int, ...]) -> str | None:
    """What is wrong with one saved ``trainable_tokens_delta`` (the rule of ``layer_kinds.TOKENS``): one row per
    token index, unique non-negative indices; with the base (``base-match``) also rows as wide as the weight and
    indices within its vocab."""
    from harness.model.layer_kinds import TOKENS
    from harness.numerics.applied import token_indices

    indices, _why = token_indices(config, module, base.input_embedding if base else None)
    if indices is None:
        return None  # PEFT makes no token adapter for it: key-coverage reports the key
    held = base.weights.get(base.checkpoint_key(f"{module}.weight")) if base else None
    problem = TOKENS.rows_problem(indices, shape, held[0] if held else None)
    return f"{module}: {problem}" if problem else None


def check_shapes(ctx: CheckContext):
    reason = _data_unavailable(ctx)
    if reason:
        return skipped(reason)
    config = _config(ctx)
    tensors = ctx.adapter.tensors
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    empty = 0
    for info in analyse_keys(ctx).lora:
        shape = tensors[info.key].shape
        if tensors[info.key].numel == 0:
            empty += 1
            continue
        part = info.lora_kind + (".bias" if info.key.endswith(".bias") else "")
        modules.setdefault(info.module, {})[part] = shape
    problems: list[str] = []
    token_modules = 0
    for info in analyse_keys(ctx).of("trainable_tokens"):
        if info.adapter_name is None and tensors[info.key].numel:
            token_modules += 1
            if problem := tokens_shape_problem(None, config, info.module, tuple(tensors[info.key].shape)):
                problems.append(problem)
    if not modules and not token_modules:
        return skipped("no non-empty LoRA tensors" + (" (see empty-tensors)" if empty else ""))

    ranks: dict[int, int] = {}
    for module, parts in modules.items():
        problem, rank = _module_shape_problem(config, module, parts)
        if problem:
            problems.append(problem)
        elif rank is not None:
            ranks[rank] = ranks.get(rank, 0) + 1
    if problems:
        return failed(
            f"{len(problems)} LoRA module(s) with inconsistent shapes: {problems[0]}",
            problems=_examples(problems, 10),
            count=len(problems),
        )
    rank_text = ", ".join(f"r={r} x{n}" for r, n in sorted(ranks.items()))
    tokens_text = f"; trainable tokens on {token_modules} module(s)" if token_modules else ""
    return passed(f"{sum(ranks.values())} LoRA modules, shapes consistent with the config ({rank_text}){tokens_text}",
                  ranks={str(k): v for k, v in ranks.items()}, trainable_tokens=token_modules)


register(
    id="shapes",
    group="static",
    summary="lora_A not [r, in] or lora_B not [out, r], A and B ranks that disagree, a rank that differs from "
    "r / rank_pattern in the config, lora_A without lora_B, DoRA magnitudes that do not match lora_B, "
    "trainable_tokens_delta not [len(trainable_token_indices), hidden] or token indices outside the vocab",
    why="PEFT builds each LoRA layer from the config's rank and then copies the saved tensors in: a mismatch "
    "fails the load, or (with a hand-edited config) loads with the wrong scaling alpha/r",
    fix="make adapter_config.json's r / rank_pattern match the trained weights (regenerate it with save_pretrained)",
)(check_shapes)


# -- finite ----------------------------------------------------------------------------------------


def check_finite(ctx: CheckContext):
    reason = _data_unavailable(ctx)
    if reason:
        return skipped(reason)
    ctx.say("scanning tensor data")
    stats = tensor_scan(ctx)
    errors = {k: s.error for k, s in stats.items() if s.error}
    bad = {k: s for k, s in stats.items() if not s.finite}
    if bad:
        first_key, first = next(iter(bad.items()))
        return failed(
            f"{len(bad)} tensor(s) contain NaN/Inf (e.g. {first_key}: {first.nan} NaN, {first.inf} Inf)",
            tensors={k: {"nan": s.nan, "inf": s.inf, "numel": s.numel} for k, s in _examples(bad.items(), 10)},
            count=len(bad),
        )
    if errors:
        key = next(iter(errors))
        return failed(f"could not read tensor {key}: {errors[key]}", fix="re-save or re-download the adapter",
                      errors=dict(_examples(errors.items(), 10)))
    return passed(f"all {len(stats)} tensors finite")


register(
    id="finite",
    group="static",
    summary="NaN or Inf values in any adapter tensor",
    why="a single NaN in lora_A/lora_B turns every output of the adapted layer into NaN (fp16 overflow or a "
    "diverged run); merging spreads it into the base weights",
    fix="retrain or take an earlier checkpoint; for fp16 overflow train/save in bf16 or fp32",
)(check_finite)


# -- noop ------------------------------------------------------------------------------------------


def check_noop(ctx: CheckContext):
    reason = _data_unavailable(ctx)
    if reason:
        return skipped(reason)
    keys = analyse_keys(ctx)
    b_keys = [i.key for i in keys.lora if i.lora_kind in B_KINDS and not i.key.endswith(".bias")]
    if not b_keys:
        return skipped("no lora_B tensors")
    stats = tensor_scan(ctx)
    nonempty = [k for k in b_keys if stats[k].numel > 0]
    if not nonempty:
        return skipped("every lora_B is empty (see empty-tensors)")
    zero = [k for k in nonempty if not stats[k].nonzero and stats[k].error is None]
    if len(zero) == len(nonempty):
        other_effects = [i.key for i in keys.infos if i.kind in ("modules_to_save", "trainable_tokens", "bias")
                         or i.lora_kind == "lora_magnitude_vector"]
        if other_effects:
            return warned(
                f"all {len(zero)} lora_B tensors are zero; only {len(other_effects)} other tensor(s) "
                f"(modules_to_save / trainable tokens / DoRA magnitudes / biases) can change the model",
                zero=len(zero),
            )
        return failed(
            f"all {len(zero)} lora_B tensors are exactly zero: an untrained adapter, it changes nothing",
            zero=len(zero),
            examples=_examples(zero, 5),
        )
    if zero:
        return warned(
            f"{len(zero)} of {len(nonempty)} lora_B tensors are exactly zero (e.g. {zero[0]}): those modules "
            f"were never updated",
            fix="check that those modules received gradients (frozen layers, layers_to_transform, unused branches)",
            zero=len(zero),
            examples=_examples(zero, 5),
        )
    return passed(f"all {len(nonempty)} lora_B tensors are non-zero")


register(
    id="noop",
    group="static",
    summary="every lora_B is all zero: an untrained adapter (PEFT initialises lora_B to zero), so merging or "
    "loading it changes nothing",
    why="the usual cause is saving before training, training the wrong parameters, or an optimizer that never "
    "stepped; the result looks like a valid adapter and silently does nothing",
    fix="check that the LoRA parameters were trainable and the optimizer stepped, then save after training",
)(check_noop)


# -- full-checkpoint -------------------------------------------------------------------------------


def check_full_checkpoint(ctx: CheckContext):
    adapter: AdapterInputs = ctx.adapter
    if adapter.primary is None and not adapter.foreign_files:
        return skipped("no readable weights file (see weights-readable)")
    reason = full_checkpoint_reason(ctx)
    if reason:
        return failed(reason)
    return passed(f"an adapter: {len(analyse_keys(ctx).lora)} LoRA tensors")


register(
    id="full-checkpoint",
    group="static",
    summary="the input is a full model state dict or a merged model directory, not a LoRA adapter",
    why="a merged model or full state dict passed where an adapter is expected fails to load as an adapter, "
    "or (loaded with load_state_dict) reports missing PLoRA weights; it needs the merged-model checks instead",
    fix="pass the directory written by peft_model.save_pretrained() as --adapter; to verify a merged model, "
    "pass it as --merged together with --base-model and --adapter",
)(check_full_checkpoint)
