"""The real XComposer model from a path: merged vs unmerged, greedy generation, merge-script reload.

The user's model directory (IXC2, IXC2-4KHD or IXC2.5, with its own remote code) is loaded once
on the device in bf16, the adapter (theirs, or a deterministic r=64 official-recipe one written
next to the run when none is given) is attached with ``PeftModel.from_pretrained``, run, merged
in place with ``merge_and_unload`` and run again; then the merge script's output is saved and
reloaded fresh. At most one 7B model is on the device at any time.

- **merged vs unmerged**: logits on a probe with image rows (``im_mask`` True), text rows and left
  padding, and on a text-only probe, within the dtype's tolerance per row class.
- **greedy generation**: an image+text prompt prefilled as ``inputs_embeds`` + ``im_mask`` (as
  XComposer feeds images), decoded token by token; merged and unmerged must pick the same tokens,
  unless they part at a near-tie that the dtype cannot resolve (reported, not failed).
- **reload roundtrip**: ``save_pretrained`` + the base's ``*.py`` and tokenizer files, then a fresh
  ``from_pretrained``: no missing weights (they would be re-initialised), same logits, finite.

Image rows are deterministic vectors at the scale of the token embeddings, not CLIP features:
what is checked is the language model's merge, and PLoRA acts on whatever rows ``im_mask`` marks.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compat import ATTN_IMPLEMENTATION_KWARG, FLASH_ATTENTION
from ..inputs import InputError
from ..paths import capture_warnings, copy_model_extras, load_base
from ..probes import ProbeBatch, make_probe
from ..reference import compare, tolerance_for
from .figures import environment, gib, overall_peak, phase
from .full_size import row_errors
from .quirks import (
    Quirk,
    RealModelError,
    diagnose_dir,
    diagnose_loaded,
    explain_load_error,
)

PROMPT_BEFORE = "[UNUSED_TOKEN_146]user\n"
PROMPT_AFTER = "Describe this image in detail.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"


@dataclass
class LoadedReal:
    model: torch.nn.Module
    tokenizer: object | None
    quirks: list[Quirk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loading_info: dict | None = None


def load_real_model(model_dir: str | Path, *, dtype: torch.dtype, device: str, attn_implementation: str = "eager",
                    check_behaviour: bool = True, output_loading_info: bool = False) -> LoadedReal:
    """Load a real XComposer2 directory the way the harness needs it, or raise ``RealModelError`` (one sentence).

    Static quirks are checked before anything runs; flash attention is replaced by
    ``attn_implementation`` through the model's own config field and from_pretrained's keyword (both
    recorded in ``notes``); the model is not modified otherwise. ``check_behaviour`` then runs the
    behavioural diagnostics and raises on an error-level one (no PLoRA, im_mask ignored, NaN logits).
    """
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    quirks = diagnose_dir(model_dir)
    errors = [q for q in quirks if q.severity == "error"]
    if errors:
        raise RealModelError(errors[0].sentence(), quirks)
    notes: list[str] = []
    kwargs: dict = {"attn_implementation": attn_implementation} if ATTN_IMPLEMENTATION_KWARG else {}
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        asked = getattr(config, "attn_implementation", None)
        if asked in FLASH_ATTENTION and asked != attn_implementation:
            config.attn_implementation = attn_implementation  # the remote code's own switch
        flash_in_json = any(q.id == "flash-attention" for q in quirks)
        if asked in FLASH_ATTENTION or (flash_in_json and ATTN_IMPLEMENTATION_KWARG):
            notes.append(f"config.json asks for flash attention; loaded with attn_implementation={attn_implementation!r}")
        with capture_warnings(notes):
            loaded = load_base(model_dir, dtype=dtype, device=device, config=config,
                               output_loading_info=output_loading_info, **kwargs)
    except RealModelError:
        raise
    except InputError as err:  # already one sentence (e.g. a folder name remote code cannot be imported from)
        raise RealModelError(str(err), quirks) from err
    except Exception as err:  # noqa: BLE001 - remote code raises anything; explained in one sentence
        raise RealModelError(explain_load_error(err, model_dir), quirks) from err
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    except Exception as err:  # noqa: BLE001 - prompts fall back to random token ids
        notes.append(f"tokenizer not loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                     "prompts use fixed random token ids")
    if check_behaviour:
        found = diagnose_loaded(model, model_dir)
        quirks += found
        errors = [q for q in found if q.severity == "error"]
        if errors:
            del model
            raise RealModelError(errors[0].sentence(), quirks)
    return LoadedReal(model, tokenizer, quirks, notes, info)


def image_text_prompt(embedding: torch.nn.Module, tokenizer, *, image_rows: int = 64, seed: int = 0) -> ProbeBatch:
    """One prompt: text, ``image_rows`` image rows (im_mask True), text, as XComposer's chat template lays it out."""
    weight = embedding.weight
    gen = torch.Generator().manual_seed(seed)

    def ids(text: str, fallback: int) -> list[int]:
        found = tokenizer(text, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
        return list(found) or torch.randint(4, weight.shape[0], (fallback,), generator=gen).tolist()

    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    before, after = ([bos] if bos is not None else []) + ids(PROMPT_BEFORE, 4), ids(PROMPT_AFTER, 12)
    input_ids = torch.tensor([before + [0] * image_rows + after])
    im_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    im_mask[0, len(before):len(before) + image_rows] = True
    with torch.no_grad():
        embeds = embedding(input_ids.to(weight.device)).float().cpu()
        rms = embeds[~im_mask].pow(2).mean().sqrt()
        rows = torch.randn(1, input_ids.shape[1], weight.shape[1], generator=gen) * rms
        embeds = torch.where(im_mask[..., None], rows, embeds)
    return ProbeBatch(input_ids=input_ids.to(weight.device), inputs_embeds=embeds.to(weight.device, weight.dtype),
                      im_mask=im_mask.to(weight.device), attention_mask=torch.ones_like(input_ids).to(weight.device),
                      description=f"image+text prompt, {image_rows} image rows")


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: ProbeBatch, *, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's fp32 logits: prefill from ``inputs_embeds`` + ``im_mask``, then token by token.

    Decoding steps pass ``input_ids`` and an all-False ``im_mask`` (XComposer rebuilds it so anyway):
    ``generate(inputs_embeds=..., im_mask=...)`` breaks in the real code's own input preparation.
    """
    param = next(model.parameters())
    attention = prompt.attention_mask.to(param.device)
    out = model(inputs_embeds=prompt.inputs_embeds.to(param.device, param.dtype), attention_mask=attention,
                im_mask=prompt.im_mask.to(param.device), use_cache=True)
    tokens, steps = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        steps.append(logits[0].cpu())
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token[0, 0]))
        if step + 1 == max_new_tokens:
            break
        # transformers 5 names the cache ``cache``; the real (4.x-era) code ``past_key_values``
        cache_kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        attention = torch.cat([attention, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=attention, use_cache=True,
                    im_mask=torch.zeros_like(token, dtype=torch.bool), **{cache_kw: getattr(out, cache_kw)})
    return tokens, steps


def compare_generations(unmerged: tuple[list[int], list[torch.Tensor]], merged: tuple[list[int], list[torch.Tensor]],
                        *, dtype: torch.dtype) -> dict:
    """Same tokens, or the first step where they part and whether that step was a near-tie.

    A near-tie: the unmerged top-2 logit margin there is within the dtype tolerance of the logit
    scale, so rounding alone may flip it; anything wider is a real disagreement.
    """
    tokens_u, steps_u = unmerged
    tokens_m, _ = merged
    result = {"unmerged": tokens_u, "merged": tokens_m, "equal": tokens_u == tokens_m, "first_difference": None,
              "margin_rel": None, "near_tie": False}
    if result["equal"]:
        return result
    step = next(i for i, (a, b) in enumerate(zip(tokens_u, tokens_m)) if a != b)
    top = steps_u[step].topk(2).values
    margin_rel = float(top[0] - top[1]) / max(float(steps_u[step].abs().max()), 1e-30)
    result.update(first_difference=step, margin_rel=margin_rel, near_tie=margin_rel <= tolerance_for(dtype))
    return result


@dataclass
class RealRunResult:
    model_dir: str
    adapter_dir: str
    adapter_source: str  # "given" or how it was synthesised
    dtype: torch.dtype
    device: str
    environment: dict
    quirks: list[Quirk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # merged vs unmerged: {probe: {row class: row_errors}}
    comparisons: dict = field(default_factory=dict)  # label -> reference.Comparison.to_dict()
    generation: dict = field(default_factory=dict)
    reload: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def figures(self) -> dict:
        return {
            "ok": self.ok, "problems": list(self.problems), "model_dir": self.model_dir,
            "adapter": self.adapter_dir, "adapter_source": self.adapter_source,
            "dtype": str(self.dtype).replace("torch.", ""), "environment": self.environment,
            "quirks": [q.sentence() for q in self.quirks], "notes": list(self.notes),
            "outputs": self.outputs, "comparisons": self.comparisons, "generation": self.generation,
            "reload": self.reload, "time_s": {k: round(v, 3) for k, v in self.timings.items()},
            "peak_memory_gib": {k: gib(v) for k, v in self.peak_memory.items()},
        }


class RealModelRun:
    """One run on a real model directory. Steps are methods so a test double can break one."""

    def __init__(self, model_dir: str | Path, adapter_dir: str | Path | None = None, *, workdir: str | Path,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cuda", lora_r: int = 64, seed: int = 0,
                 effect_scale: float = 0.2, max_new_tokens: int = 8, image_rows: int = 64) -> None:
        self.model_dir, self.workdir = Path(model_dir), Path(workdir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.dtype, self.device, self.lora_r, self.seed = dtype, device, lora_r, seed
        self.effect_scale, self.max_new_tokens, self.image_rows = effect_scale, max_new_tokens, image_rows
        self.result = RealRunResult(str(self.model_dir), str(adapter_dir or ""), "given" if adapter_dir else "",
                                    dtype, device, environment(device))

    # -- steps -------------------------------------------------------------------------------

    def load(self, model_dir: Path, **kwargs) -> LoadedReal:
        return load_real_model(model_dir, dtype=self.dtype, device=self.device, **kwargs)

    def synthesise_adapter(self, model: torch.nn.Module) -> Path:
        """A deterministic official-recipe adapter (r=``lora_r``) saved with ``save_pretrained``; model restored."""
        from ..synthetic.adapters import save_adapter
        from .build import attach_lora

        out = self.workdir / "adapter"
        peft_model = attach_lora(model, r=self.lora_r, seed=self.seed, effect_scale=self.effect_scale)
        peft_model.peft_config["default"].base_model_name_or_path = str(self.model_dir)
        save_adapter(peft_model, out)
        peft_model.unload()  # back to the plain base modules; the adapter now lives only in ``out``
        self.result.adapter_source = f"synthesised: official targets, r={self.lora_r}, seed {self.seed}"
        return out

    def attach(self, model: torch.nn.Module, adapter_dir: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir).eval()

    def merge(self, peft_model) -> torch.nn.Module:
        return peft_model.merge_and_unload()

    def save_merged(self, model: torch.nn.Module, out: Path) -> Path:
        """The official merge script's output: ``save_pretrained`` plus the base's code and tokenizer files."""
        model.save_pretrained(out, safe_serialization=True)
        copy_model_extras(self.model_dir, out)
        return out

    # -- the run -----------------------------------------------------------------------------

    @torch.no_grad()
    def run(self) -> RealRunResult:
        r, t, peaks, dev = self.result, self.result.timings, self.result.peak_memory, self.device
        start = time.perf_counter()
        with phase(t, peaks, "load", dev):
            loaded = self.load(self.model_dir)
        r.quirks, r.notes = list(loaded.quirks), list(loaded.notes)
        model = loaded.model
        embedding = model.get_input_embeddings()
        probe = make_probe(embedding, batch_size=2, seq_len=48, image_spans=[(12, 36)], left_padding=[0, 5],
                           seed=self.seed + 11)
        text_probe = make_probe(embedding, batch_size=2, seq_len=48, image_spans=[], left_padding=[0, 5],
                                seed=self.seed + 11)
        prompt = image_text_prompt(embedding, loaded.tokenizer, image_rows=self.image_rows, seed=self.seed)
        base = {"probe": self._logits(model, probe), "text_probe": self._logits(model, text_probe)}
        with phase(t, peaks, "adapter", dev):
            adapter_dir = self.adapter_dir or self.synthesise_adapter(model)
            r.adapter_dir = str(adapter_dir)
            peft_model = self.attach(model, adapter_dir)
        with phase(t, peaks, "unmerged", dev):
            unmerged = {"probe": self._logits(peft_model, probe), "text_probe": self._logits(peft_model, text_probe)}
            generated_unmerged = greedy(peft_model, prompt, max_new_tokens=self.max_new_tokens)
        with phase(t, peaks, "merge", dev):
            merged_model = self.merge(peft_model)
        del peft_model, model, loaded
        with phase(t, peaks, "merged", dev):
            merged = {"probe": self._logits(merged_model, probe), "text_probe": self._logits(merged_model, text_probe)}
            generated_merged = greedy(merged_model, prompt, max_new_tokens=self.max_new_tokens)
        self._check_merge(base, unmerged, merged, probe, text_probe)
        self._check_generation(generated_unmerged, generated_merged)
        with phase(t, peaks, "save", dev):
            out = self.save_merged(merged_model, self.workdir / "merged")
        del merged_model
        self._release()
        with phase(t, peaks, "reload", dev):
            self._check_reload(out, merged, probe, text_probe)
        peaks["overall"] = overall_peak(peaks)
        t["total"] = time.perf_counter() - start
        return r

    # -- checks ------------------------------------------------------------------------------

    def _logits(self, model: torch.nn.Module, probe: ProbeBatch) -> torch.Tensor:
        param = next(model.parameters())
        out = model(inputs_embeds=probe.inputs_embeds.to(param.device, param.dtype),
                    attention_mask=probe.attention_mask.to(param.device), im_mask=probe.im_mask.to(param.device),
                    use_cache=False)
        return out.logits.float().cpu()

    def _check_merge(self, base, unmerged, merged, probe: ProbeBatch, text_probe: ProbeBatch) -> None:
        r, tol = self.result, tolerance_for(self.dtype)
        for key, batch, classes in (("probe", probe, ("image", "text")), ("text_probe", text_probe, ("text",))):
            comparison = compare(merged[key], unmerged[key], batch, dtype=self.dtype,
                                 label=f"merged vs unmerged ({key.replace('_', ' ')})")
            r.comparisons[key] = comparison.to_dict()
            r.outputs[key] = {}
            for row_class in classes:
                rows = batch.image_rows if row_class == "image" else batch.text_rows
                stats = row_errors(merged[key], unmerged[key], base[key], rows)
                r.outputs[key][row_class] = stats
                if stats["effect_rel_output"] <= tol:
                    r.notes.append(f"the adapter changes the {row_class} rows of the {key.replace('_', ' ')} by only "
                                   f"{stats['effect_rel_output']:.1e} of their scale, within the {tol:.0e} tolerance: "
                                   "merged vs unmerged cannot tell a merge from rounding there")
            finite = torch.isfinite(merged[key]).all() and torch.isfinite(unmerged[key]).all()
            if not comparison.ok or not finite:
                r.problems.append(comparison.summary() + ("" if finite else "; the logits are not finite"))

    def _check_generation(self, unmerged, merged) -> None:
        r = self.result
        r.generation = compare_generations(unmerged, merged, dtype=self.dtype)
        g = r.generation
        if g["equal"]:
            return
        text = (f"greedy generation: merged and unmerged part at new token {g['first_difference']} "
                f"({g['unmerged'][g['first_difference']]} vs {g['merged'][g['first_difference']]}), where the "
                f"unmerged top-2 margin is {g['margin_rel']:.1e} of the logit scale")
        if g["near_tie"]:
            r.notes.append(text + f": a near-tie within the {tolerance_for(self.dtype):.0e} tolerance, not a failure")
        else:
            r.problems.append(text)

    def _check_reload(self, out: Path, merged, probe: ProbeBatch, text_probe: ProbeBatch) -> None:
        r = self.result
        try:
            loaded = self.load(out, check_behaviour=False, output_loading_info=True)
        except RealModelError as err:
            r.reload = {"error": str(err)}
            r.problems.append(f"reload of the merged checkpoint {out}: {err}")
            return
        info = loaded.loading_info or {}
        missing = sorted(info.get("missing_keys", []) or [])
        unexpected = sorted(info.get("unexpected_keys", []) or [])
        reloaded = {"probe": self._logits(loaded.model, probe), "text_probe": self._logits(loaded.model, text_probe)}
        del loaded
        self._release()
        r.reload = {"missing_keys": missing[:20], "unexpected_keys": unexpected[:20],
                    "bit_identical": all(torch.equal(reloaded[k], merged[k]) for k in merged)}
        if missing:
            r.problems.append(f"reload of the merged checkpoint {out}: {len(missing)} weight(s) missing and "
                              f"re-initialised, e.g. {missing[0]}")
        if unexpected:
            r.notes.append(f"reload of the merged checkpoint: {len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        for key, batch in (("probe", probe), ("text_probe", text_probe)):
            comparison = compare(reloaded[key], merged[key], batch, dtype=self.dtype,
                                 label=f"reloaded vs merged ({key.replace('_', ' ')})")
            r.reload[key] = comparison.to_dict()
            if not torch.isfinite(reloaded[key]).all():
                r.problems.append(f"reload of the merged checkpoint {out}: NaN/inf logits after a fresh load "
                                  "(transformers 5.x leaves the real code's rotary buffers uninitialised; use 4.x)")
            elif not comparison.ok:
                r.problems.append(comparison.summary())

    def _release(self) -> None:
        gc.collect()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()
