"""``merged-matches``: a merged checkpoint equals base + adapter, tensor by tensor, and ships whole.

Streams every tensor once (base, merged and adapter are mmapped views), so memory
stays at a few tensors whatever the model size. What the merge must contain is what
PEFT applies (``harness.numerics.applied``) by the base module's layer kind
(``harness.model.layer_kinds``): adapted weights W + s·B·A computed in fp32 in the
module's stored layout (DoRA renormalised, lora_B.bias added to the bias),
``modules_to_save`` tensors replaced by the trained copies, trainable token rows written over the
embedding's rows (a tied head shares them and stays tied), everything else equal to
the base after the cast to the merged dtype. Parameters map to checkpoint keys through
the base model (``BaseModelInfo.checkpoint_key``), and a tied pair the adapter changes
on one side only must come out untied. Tolerances are relative to the tensor's
magnitude, per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.merged_advice import DeltaRatio, dtype_cause, fixes, scaling_cause
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.inputs.errors import InputError
from harness.model import families
from harness.model.layer_kinds import CONV1D, TOKENS
from harness.numerics.applied import AdapterPlan, LoraModule, SavedCopy, TrainedTokens, plan_adapter
from harness.numerics.tolerances import merged_weight_tolerances, policy_for

if TYPE_CHECKING:
    import torch

    from harness.inputs.model_dir import ModelDir
    from harness.model.structure import BaseModelInfo


@dataclass
class MergedFindings:
    missing: list[str] = field(default_factory=list)  # base tensors absent from the merged checkpoint
    unexpected: list[str] = field(default_factory=list)
    wrong_delta: list[str] = field(default_factory=list)  # adapted weights that are not W + s·B·A
    unmerged: list[str] = field(default_factory=list)  # adapted weights equal to the base (layer skipped)
    plora_folded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # tensors that should equal the base but do not
    unresolved: list[str] = field(default_factory=list)  # ΔW below the dtype's resolution
    copies_dropped: list[str] = field(default_factory=list)  # modules_to_save tensors left at the base value
    copies_wrong: list[str] = field(default_factory=list)  # modules_to_save tensors that are neither
    tokens_dropped: list[str] = field(default_factory=list)  # trained token rows left at the base value
    tokens_wrong: list[str] = field(default_factory=list)  # trained token rows wrong, or other rows changed
    ties: list[str] = field(default_factory=list)  # tied pairs the adapter changes on one side, merged tied
    untie_expected: bool = False  # the adapter changes one side of a tie: tie_word_embeddings false is right
    ignored: list[str] = field(default_factory=list)  # saved tensors PEFT does not apply (why)
    dtypes: set = field(default_factory=set)
    worst: tuple[float, str] = (0.0, "")
    ratios: list[DeltaRatio] = field(default_factory=list)  # wrong ΔW that are exactly a multiple of s·B·A


@dataclass
class _Expected:
    """What one merged checkpoint key must hold."""

    what: str  # "lora" | "lora_bias" | "copy" | "tokens"
    lora: LoraModule | None = None
    copy: SavedCopy | None = None
    tokens: TrainedTokens | None = None


def _rel(err: torch.Tensor, scale: torch.Tensor) -> float:
    return float(err) / max(float(scale), 1e-12)


def _targets(ctx: CheckContext) -> set[str] | None:
    """The modules PEFT wraps (target_modules resolved on the base); None: every module with tensors."""
    if not (ctx.adapter.config or {}).get("target_modules"):
        return None
    from harness.checks.against_base import target_resolution

    try:
        return set(target_resolution(ctx).matched)
    except Exception:  # noqa: BLE001 - config-valid / targets-resolve report an unusable config
        return None


def adapter_plan(ctx: CheckContext) -> AdapterPlan:
    tensors = ctx.adapter.tensors
    return ctx.cached("merged.plan", lambda: plan_adapter(
        ctx.adapter.config or {}, list(tensors), lambda key: tuple(tensors[key].shape),
        kinds=ctx.base.layer_kinds(), targets=_targets(ctx), input_embedding=ctx.base.input_embedding))


class _Merge:
    """The expected content of the merged checkpoint, key by key, and the comparison."""

    def __init__(self, ctx: CheckContext, base: ModelDir, merged: ModelDir) -> None:
        self.info: BaseModelInfo = ctx.base
        self.base, self.merged, self.get = base, merged, ctx.adapter.primary.get_tensor
        self.plan = adapter_plan(ctx)
        self.found = MergedFindings(ignored=self.plan.notes())
        self.expected: dict[str, _Expected] = {}
        self.base_override: dict[str, str] = {}  # base key -> saved key whose value PEFT loads as the base
        self.alias_base: dict[str, str] = {}  # untied key of a tied parameter -> base key holding its value
        for alias, holder in self.info.tied.items():
            self.alias_base[self.info.own_key(alias)] = self.info.checkpoint_key(holder)
        for copy in self.plan.copies:
            if copy.role == "modules_to_save":
                self.expected[self._key_of(copy.param)] = _Expected("copy", copy=copy)
            else:
                self.base_override[self.info.checkpoint_key(copy.param)] = copy.key
        for tokens in self.plan.tokens:  # a tied head shares the rows (PEFT ties its token adapter): one tensor
            for param in (tokens.weight, *self.info.tied_partners(tokens.weight)):
                self.expected[self.info.own_key(param)] = _Expected("tokens", tokens=tokens)
            self.expected[self.info.checkpoint_key(tokens.weight)] = _Expected("tokens", tokens=tokens)
        for lora in self.plan.lora:
            self.expected[self._key_of(lora.weight)] = _Expected("lora", lora=lora)
            if f"{lora.kind.parts[1]}.bias" in lora.keys:
                self.expected[self._key_of(lora.bias)] = _Expected("lora_bias", lora=lora)

    def _key_of(self, param: str) -> str:
        """Where the merged checkpoint keeps ``param``'s merged value: its own key when it is tied to a partner the
        adapter leaves alone (the merge must untie them), else the key the base keeps it under."""
        return self.info.own_key(param) if self._changes_one_side(param) else self.info.checkpoint_key(param)

    def _changed_params(self) -> set[str]:
        tokens = {p for t in self.plan.tokens for p in (t.weight, *self.info.tied_partners(t.weight))}
        return {lora.weight for lora in self.plan.lora} | {c.param for c in self.plan.copies
                                                            if c.role == "modules_to_save"} | tokens

    def _changes_one_side(self, param: str) -> bool:
        partners = self.info.tied_partners(param)
        return bool(partners) and any(p not in self._changed_params() for p in partners)

    def base_value(self, key: str) -> torch.Tensor | None:
        if key in self.base_override:
            return self.get(self.base_override[key])
        if key in self.base.keys:
            return self.base.get(key)
        if key in self.alias_base:
            return self.base.get(self.alias_base[key])
        return None

    def run(self) -> MergedFindings:
        found = self.found
        base_keys, merged_keys = set(self.base.keys), set(self.merged.keys)
        found.missing = sorted(base_keys - merged_keys)
        for key in sorted(merged_keys):
            want = self.base_value(key)
            if want is None:
                found.unexpected.append(key)
                continue
            got = self.merged.get(key)
            found.dtypes.add(str(got.dtype).replace("torch.", ""))
            rtol = policy_for(got.dtype).merged_rel
            expected = self.expected.get(key)
            if expected is None:
                self._same_as_base(key, got, want, rtol)
            elif expected.what == "copy":
                self._copy(key, got, want, self.get(expected.copy.key), rtol, expected.copy)
            elif expected.what == "tokens":
                self._tokens(key, got, want, expected.tokens, rtol)
            else:
                self._lora(key, got, want, expected, rtol)
            del got, want
            self.merged.release(key)  # one tensor's pages at a time, whatever the checkpoint's size
            self.base.release(self.alias_base.get(key, key))
        self._ties(merged_keys)
        return found

    def _same_as_base(self, key: str, got, want, rtol: float) -> None:
        import torch

        if got.is_floating_point() and not bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all()):
            self.found.changed.append(key)  # overflow in the merged dtype (the cast base overflows the same way)
            return
        if got.shape == want.shape and torch.equal(got, want.to(got.dtype)):
            return
        if not (got.shape == want.shape and _rel((got.float() - want.float()).abs().max(), want.abs().max()) <= rtol):
            self.found.changed.append(key)

    def _copy(self, key: str, got, base, trained, rtol: float, copy: SavedCopy) -> None:
        """A modules_to_save tensor: the trained copy, not the base."""
        if got.shape != trained.shape:
            self.found.copies_wrong.append(f"{key} (shape {list(got.shape)}, the trained {copy.param} is "
                                           f"{list(trained.shape)})")
            return
        scale = trained.float().abs().max()
        err = _rel((got.float() - trained.float()).abs().max(), scale)
        if err > self.found.worst[0]:
            self.found.worst = (err, key)
        if err <= rtol:
            return
        if base.shape == got.shape and _rel((got.float() - base.float()).abs().max(), scale) <= rtol:
            self.found.copies_dropped.append(f"{key} (modules_to_save {copy.module}: the base value, not the "
                                             "trained copy)")
        else:
            self.found.copies_wrong.append(f"{key} (modules_to_save {copy.module}: error {err:.2e} of max|W|)")

    def _tokens(self, key: str, got, base, tokens: TrainedTokens, rtol: float) -> None:
        """An embedding with trainable tokens: the base with rows ``indices`` replaced by the saved rows."""
        import torch

        what = f"trainable tokens of {tokens.module}"
        rows = tokens.rows(self.get)
        if problem := TOKENS.rows_problem(list(tokens.indices), rows.shape, base.shape):
            self.found.tokens_wrong.append(f"{key} ({what}: {problem}, see base-match)")
            return
        if got.shape != base.shape:
            self.found.tokens_wrong.append(f"{key} ({what}: shape {list(got.shape)}, base {list(base.shape)})")
            return
        want = TOKENS.merged_weight(base, tokens.indices, rows)
        scale = want.abs().max()
        err = _rel((got.float() - want).abs().max(), scale)
        if err > self.found.worst[0]:
            self.found.worst = (err, key)
        if err <= rtol:
            return
        off = ((got.float() - want).abs().amax(dim=1) > rtol * float(scale)).nonzero().flatten().tolist()
        trained = set(tokens.indices)
        wrong_rows, other_rows = [i for i in off if i in trained], [i for i in off if i not in trained]
        index = torch.as_tensor(tokens.indices, dtype=torch.long)
        at_base = _rel((got.float()[index] - base.float()[index]).abs().max(), scale) <= rtol
        if not other_rows and at_base:
            self.found.tokens_dropped.append(f"{key} ({what}: rows {list(tokens.indices)[:8]} hold the base values, "
                                             "not the trained ones)")
            return
        parts = []
        if wrong_rows:
            parts.append(f"rows {wrong_rows[:8]} are not the trained values")
        if other_rows:
            parts.append(f"rows {other_rows[:8]} changed that the adapter does not train")
        self.found.tokens_wrong.append(f"{key} ({what} {list(tokens.indices)[:8]}: {'; '.join(parts)}; error "
                                       f"{err:.2e} of max|W|)")

    def _lora(self, key: str, got, base, expected: _Expected, rtol: float) -> None:
        """An adapted weight (or a lora_bias bias): base + ΔW by the module's layer kind."""
        lora = expected.lora
        if expected.what == "lora_bias":
            want = base.float() + lora.bias_delta(self.get).to(base.device)
        else:
            delta = lora.delta(self.get)
            kind = lora.kind
            if not lora.kind_from_base and delta.shape != base.shape and delta.T.shape == base.shape:
                kind, delta = CONV1D, delta.T  # no module tree: only the weight's shape tells a Conv1D apart
            if delta.shape != base.shape:
                self.found.wrong_delta.append(f"{key} (ΔW {list(delta.shape)} does not fit the base weight "
                                              f"{list(base.shape)}, see base-match)")
                return
            want = kind.merged_weight(base, delta, lora.magnitude(self.get))
        if got.shape != want.shape:
            self.found.wrong_delta.append(f"{key} (shape {list(got.shape)}, expected {list(want.shape)})")
            return
        scale = want.abs().max()
        err = _rel((got.float() - want).abs().max(), scale)
        resolution = _rel((want - base.float()).abs().max(), scale)
        if err > self.found.worst[0]:
            self.found.worst = (err, key)
        if resolution <= rtol:  # max|ΔW| is within rounding of max|W|: judge element by element where ΔW shows
            verdict, ratio, share = judge_by_element(got, base, want)
            if verdict == UNRESOLVED:
                self.found.unresolved.append(key)
            elif verdict == UNMERGED:
                self.found.unmerged.append(key)
            elif verdict == WRONG:
                if _folds_plora(self.base, key, got, want, rtol, self.info.family):
                    self.found.plora_folded.append(key)
                else:
                    self.found.wrong_delta.append(f"{key} ({ratio:.0%} of the {share:.0%} of its elements where ΔW is "
                                                  "above the dtype's rounding are off by more than half of ΔW)")
                    if lora.magnitude(self.get) is None and expected.what == "lora":
                        self._ratio_by_element(key, got, base, want, lora)
        elif err > rtol:
            if _rel((got.float() - base.float()).abs().max(), scale) <= rtol:
                self.found.unmerged.append(key)
            elif _folds_plora(self.base, key, got, want, rtol, self.info.family):
                self.found.plora_folded.append(key)
            else:
                self.found.wrong_delta.append(f"{key} (error {err:.2e} of max|W|, ΔW is {resolution:.2e})")
                if lora.magnitude(self.get) is None and expected.what == "lora":
                    self._ratio(key, got, base, want, lora, rtol)

    def _ratio(self, key: str, got, base, want, lora: LoraModule, rtol: float) -> None:
        """Record the factor when the merged change from the base is exactly k·ΔW (a scaling cause)."""
        applied, expected = got.float() - base.float(), want - base.float()
        k = float((applied * expected).sum() / (expected * expected).sum().clamp_min(1e-30))
        if _rel((applied - k * expected).abs().max(), want.abs().max()) <= rtol:
            self.found.ratios.append(DeltaRatio(key, k, lora.rank, lora.scaling))

    def _ratio_by_element(self, key: str, got, base, want, lora: LoraModule) -> None:
        """``_ratio`` for a weight judged element by element: k when the applied change is k·ΔW (to within a
        quarter of ΔW) on nine in ten of the elements where ΔW is above rounding."""
        num = den = 0.0
        for g, _, w, delta in _shown_chunks(got, base, want):
            num += float((g - (w - delta)) @ delta)
            den += float(delta @ delta)
        k = num / max(den, 1e-30)
        shown = fits = 0
        for g, _, w, delta in _shown_chunks(got, base, want):
            shown += g.numel()
            fits += int(((g - (w - delta)) - k * delta).abs().le(0.25 * delta.abs()).sum())
        if shown and fits >= 0.9 * shown:
            self.found.ratios.append(DeltaRatio(key, k, lora.rank, lora.scaling))

    def _ties(self, merged_keys: set[str]) -> None:
        """A tied pair the adapter changes on one side must come out as two tensors, and stay untied on reload."""
        tie = self.merged.config.get("tie_word_embeddings",
                                     self.base.config.get("tie_word_embeddings", bool(self.info.tied)))
        for param in sorted(self._changed_params()):
            if not self._changes_one_side(param):
                continue
            self.found.untie_expected = True
            partners = [p for p in self.info.tied_partners(param) if p not in self._changed_params()]
            module, partner = param.rsplit(".", 1)[0], partners[0].rsplit(".", 1)[0]
            separate = [self.info.own_key(p) for p in (param, *partners)]
            if not all(key in merged_keys for key in separate):
                self.found.ties.append(
                    f"{module} is tied to {partner} (tie_word_embeddings) and the adapter changes only {module}, but "
                    f"the merged checkpoint keeps one shared tensor ({self.info.checkpoint_key(param)}), so it cannot "
                    f"hold both the adapter's {module} and the base {partner} as the unmerged adapter does; save them "
                    f"untied (tie_word_embeddings: false, separate {' and '.join(separate)})")
            elif tie:
                default = " (the default)" if "tie_word_embeddings" not in self.merged.config else ""
                self.found.ties.append(
                    f"{self.info.own_key(param)} holds the adapter's {module} but config.json keeps "
                    f"tie_word_embeddings true{default}: on reload transformers re-ties {module} to {partner} and "
                    f"the adapter's {module} is lost; set tie_word_embeddings: false")


def compare_merged(ctx: CheckContext, base: ModelDir, merged: ModelDir) -> MergedFindings:
    return _Merge(ctx, base, merged).run()


UNRESOLVED, UNMERGED, WRONG, RIGHT = "unresolved", "unmerged", "wrong", "right"
RESOLVED_ULPS = 4  # an element shows ΔW when |ΔW| is above this many spacings of the stored dtype there
MIN_SHOWN = 16  # fewer elements than this that show ΔW: the weight cannot be judged (unresolved)
CHUNK = 1 << 22  # elements per step, so a 7B weight's fp32 temporaries stay at tens of MB


def _spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between neighbouring ``dtype`` numbers at each of ``values`` (its rounding step there)."""
    import torch

    exponent = torch.frexp(values)[1].float() - 1  # values = m·2^e with 0.5 <= |m| < 1
    return torch.clamp(torch.finfo(dtype).eps * torch.exp2(exponent), min=torch.finfo(dtype).tiny)


def _shown_chunks(got: torch.Tensor, base: torch.Tensor, want: torch.Tensor):
    """Per chunk of elements: (got, base rounded to got's dtype, want, ΔW) as fp32, restricted to the elements
    where ΔW is above RESOLVED_ULPS spacings of ``got``'s dtype."""
    flat_got, flat_base, flat_want = got.reshape(-1), base.reshape(-1), want.reshape(-1)
    for start in range(0, flat_want.numel(), CHUNK):
        g = flat_got[start:start + CHUNK].float()
        b = flat_base[start:start + CHUNK].to(got.dtype).float()
        w = flat_want[start:start + CHUNK].float()
        delta = w - flat_base[start:start + CHUNK].float()
        shown = delta.abs() > RESOLVED_ULPS * _spacing(w, got.dtype)
        yield g[shown], b[shown], w[shown], delta[shown]


def judge_by_element(got: torch.Tensor, base: torch.Tensor, want: torch.Tensor) -> tuple[str, float, float]:
    """A merged weight whose ΔW is small against max|W| (the per-tensor test cannot see it), judged on the elements
    where ΔW is well above the stored dtype's rounding: (verdict, share of them off by more than half their ΔW,
    their share of the weight). A bf16 7B w2 has max|ΔW| ~1e-2 of max|W|, yet ΔW moves 87% of its elements: a merge
    that left it out, or doubled it, is off by all of ΔW on each, where a right merge is off by rounding (<= ΔW/8)."""
    if not got.dtype.is_floating_point or got.shape != want.shape or base.shape != want.shape:
        return UNRESOLVED, 0.0, 0.0
    shown = off = at_base = 0
    for g, b, w, delta in _shown_chunks(got, base, want):
        shown += g.numel()
        off += int(((g - w).abs() > 0.5 * delta.abs()).sum())
        at_base += int((g == b).sum())
    share = shown / max(want.numel(), 1)
    if shown < MIN_SHOWN:
        return UNRESOLVED, 0.0, share
    if off <= shown // 2:
        return RIGHT, off / shown, share
    return (UNMERGED if at_base >= 0.9 * shown else WRONG), off / shown, share


def _folds_plora(base: ModelDir, key: str, got: torch.Tensor, expected: torch.Tensor, rtol: float,
                 family: families.ModelFamily) -> bool:
    """Did the merge add the base model's own branch (PLoRA: Plora_B @ Plora_A · scale) into the weight too?"""
    for a_key, b_key in filter(None, [family.branch_weight_keys(key[: -len(".weight")])]):
        if a_key not in base.keys or b_key not in base.keys:
            continue
        branch = base.get(b_key).float() @ base.get(a_key).float()
        residual = got.float() - expected
        # any positive scale: the residual is a multiple of the branch's own B @ A
        scale = float((residual * branch).sum() / (branch * branch).sum().clamp_min(1e-30))
        left = residual - scale * branch
        # within rounding of max|W|, and the branch explains the residual (where ΔW itself is within rounding of
        # max|W|, as in bf16 at 7B, the first test alone holds for any residual of ΔW's size)
        if (scale > 0 and _rel(left.abs().max(), expected.abs().max()) <= rtol
                and float(left.norm()) <= 0.5 * float(residual.norm())):
            return True
    return False


def _config_problems(base: ModelDir, merged: ModelDir, found: MergedFindings) -> list[str]:
    """tie_word_embeddings against what the weights need (the other files: ``merged-whole``)."""
    if found.untie_expected and merged.config.get("tie_word_embeddings") is False:
        return []  # the adapter changes one side of the tie: untying is the correct merge
    if base.config.get("tie_word_embeddings") != merged.config.get("tie_word_embeddings"):
        return [f"config tie_word_embeddings is {merged.config.get('tie_word_embeddings')!r}, base has "
                f"{base.config.get('tie_word_embeddings')!r}"]
    return []


def _without_merged_inputs(ctx: CheckContext):
    """The skip of a merged-checkpoint check that lacks its inputs (the merged directory and the base), or None."""
    if ctx.merged is None:
        return skipped("no --merged given")
    if ctx.base is None:
        return skipped("--merged needs --base-model to compare against")
    return None


def check_merged_matches(ctx: CheckContext):
    if (missing := _without_merged_inputs(ctx)) is not None:
        return missing
    if ctx.adapter is None or ctx.adapter.primary is None or not isinstance(ctx.adapter.config, dict):
        return skipped("the adapter's tensors or config are unreadable (see the static checks)")
    from harness.checks.quantized import packed_reason
    from harness.inputs.model_dir import ModelDir

    if reason := packed_reason(ctx, "comparing merged weights with W + ΔW tensor by tensor"):
        return skipped(reason)
    try:
        base, merged = ModelDir(ctx.base.base_dir), ModelDir(ctx.merged)
    except InputError as err:  # unreadable, corrupt or escaping files: say which, never a traceback
        return failed(str(err))
    ctx.say("comparing the merged checkpoint with base + adapter, tensor by tensor")
    found = compare_merged(ctx, base, merged)
    problems = []
    if found.missing:
        plora = [k for k in found.missing if ctx.base.family.is_branch_param(k)]
        problems.append(f"{len(found.missing)} base tensor(s) missing from the merged checkpoint (re-initialised "
                        f"on load), e.g. {(plora or found.missing)[0]}")
    if found.plora_folded:
        problems.append(f"{ctx.base.family.branch_label} branch folded into the base weight of "
                        f"{len(found.plora_folded)} module(s), e.g. "
                        f"{found.plora_folded[0]} (text-token outputs change)")
    if found.unmerged:
        problems.append(f"{len(found.unmerged)} adapted weight(s) equal the base (layer not merged), e.g. "
                        f"{found.unmerged[0]}")
    scaling = scaling_cause(found.ratios, len(found.wrong_delta), ctx.adapter.config)
    dtype = dtype_cause({d for _, d in base.shapes().values()}, found.dtypes)
    if found.wrong_delta:
        problems.append(f"{len(found.wrong_delta)} adapted weight(s) differ from W + s·B·A, e.g. {found.wrong_delta[0]}"
                        + (f"; {scaling}" if scaling else ""))
    if found.copies_dropped:
        problems.append(f"{len(found.copies_dropped)} trained modules_to_save tensor(s) not merged, e.g. "
                        f"{found.copies_dropped[0]}")
    if found.copies_wrong:
        problems.append(f"{len(found.copies_wrong)} modules_to_save tensor(s) differ from the trained copy, e.g. "
                        f"{found.copies_wrong[0]}")
    if found.tokens_dropped:
        problems.append(f"{len(found.tokens_dropped)} weight(s) with trainable tokens not merged, e.g. "
                        f"{found.tokens_dropped[0]}")
    if found.tokens_wrong:
        problems.append(f"{len(found.tokens_wrong)} weight(s) with trainable tokens differ from the base with the "
                        f"trained rows written in, e.g. {found.tokens_wrong[0]}")
    problems += found.ties
    if found.changed:
        problems.append(f"{len(found.changed)} tensor(s) that the adapter does not touch changed, e.g. "
                        f"{found.changed[0]}")
    if found.unexpected:
        problems.append(f"{len(found.unexpected)} tensor(s) not in the base, e.g. {found.unexpected[0]}")
    problems += _config_problems(base, merged, found)
    details = {
        "missing": found.missing[:10], "unexpected": found.unexpected[:10], "changed": found.changed[:10],
        "wrong_delta": found.wrong_delta[:10], "unmerged": found.unmerged[:10], "plora_folded": found.plora_folded[:10],
        "copies_dropped": found.copies_dropped[:10], "copies_wrong": found.copies_wrong[:10],
        "tokens_dropped": found.tokens_dropped[:10], "tokens_wrong": found.tokens_wrong[:10], "ties": found.ties,
        "untie_expected": found.untie_expected, "ignored_adapter_tensors": found.ignored,
        "max_rel_error": found.worst[0], "worst_tensor": found.worst[1], "dtypes": sorted(found.dtypes),
        "tolerance": merged_weight_tolerances(), "problems": problems,
        "delta_ratios": {r.key: round(r.ratio, 6) for r in found.ratios[:10]},
    }
    if problems:
        advice = fixes(found, family=ctx.base.family, plora=bool(ctx.base.branch_modules()), scaling=scaling,
                       dtype=dtype, ties=found.ties)
        return failed(problems[0] + (f" (+{len(problems) - 1} more problem(s))" if len(problems) > 1 else ""),
                      fix="; ".join(dict.fromkeys(advice)) or None, **details)
    plan = adapter_plan(ctx)
    if found.unresolved and not plan.copies and not plan.tokens and len(found.unresolved) >= len(plan.lora):
        return warned(f"ΔW is below the {sorted(found.dtypes)} resolution in every adapted weight; the merge cannot "
                      "be verified from weights alone", **details)
    return passed(f"{len(merged.keys)} tensors match base + adapter (max rel error {found.worst[0]:.1e})", **details)


register(
    id="merged-matches",
    group="merged",
    summary="a merged checkpoint that is not base + adapter: mis-scaled or skipped layers, PLoRA folded into the "
    "base weight, changed or missing tensors (re-initialised on reload), re-tied weights, wrong dtype",
    why="merge scripts do no validation; a broken merged model loads without error and answers differently",
    fix="re-merge with PeftModel.from_pretrained(base, adapter) → merge_and_unload() → save_pretrained; each "
    "failure names the fix for its cause (scaling, dtype, missing tensors, PLoRA for XComposer bases)",
)(check_merged_matches)


def check_merged_whole(ctx: CheckContext):
    if (missing := _without_merged_inputs(ctx)) is not None:
        return missing
    from harness.checks.measure.shipping import shipping_problems
    from harness.inputs.model_dir import ModelDir

    try:
        base, merged = ModelDir(ctx.base.base_dir), ModelDir(ctx.merged)
    except InputError as err:
        return failed(str(err))
    ctx.say("reading the merged directory's files as from_pretrained will")
    problems = shipping_problems(base, merged)
    details = {"problems": [{"file": p.file, "problem": p.problem, "fix": p.fix} for p in problems]}
    if problems:
        more = f" (+{len(problems) - 1} more: {'; '.join(p.text() for p in problems[1:])})" if len(problems) > 1 else ""
        fixes = list(dict.fromkeys(p.fix for p in problems))
        return failed(problems[0].text() + more, fix="; ".join(fixes), **details)
    return passed("no adapter files or PEFT keys; config.json, code, tokenizer, generation config and processor files "
                  "as the base has them", **details)


register(
    id="merged-whole",
    group="merged",
    summary="a merged directory that a plain from_pretrained does not load to the verified model: adapter files left "
    "beside the merged weights (the adapter is applied twice), LoRA keys or base_layer wrappers saved instead of "
    "merged weights, config.json drift (architectures, auto_map, model_type, vocab size, a dtype other than the "
    "stored tensors'), custom code, tokenizer, generation_config.json or processor files missing or different",
    why="users load the merged directory with AutoModelForCausalLM.from_pretrained (and its tokenizer) and get "
    "whatever the files say, not the weights the harness compared",
    fix="save the merged model alone into its own directory (merge_and_unload() → save_pretrained) and copy the "
    "base's *.py, tokenizer, generation_config.json and processor files",
)(check_merged_whole)
