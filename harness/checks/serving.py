"""Serving checks: the adapter in a real serving engine (vLLM), against the fp32 reference.

The measurement (``harness.checks.measure.serving_vllm``) runs vLLM in a process of its own (one engine for the run's
admissible adapters); this
module only judges it. The reference logits and the probe token ids are the dynamic run's text probe, so the
served logprobs are compared with the same fp32 reference every loading path is.
"""

from __future__ import annotations

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped

XCOMPOSER_SKIP = ("vLLM has no XComposer2 class (InternLMXComposer2ForCausalLM is not in its model registry; it serves "
                  "InternLM2ForCausalLM without PLoRA), and LMDeploy, which served XComposer2 up to 0.13, has no CPU "
                  "engine and serves LoRA on XComposer only as merged weights: serving is not checked for this family")


def check_serving_vllm(ctx: CheckContext):
    from harness.checks.measure import serving_vllm as measure

    if ctx.base is None:
        return skipped("no --base-model given")
    if ctx.base.family.branch_modules_from_keys(ctx.base.weights):
        return skipped(XCOMPOSER_SKIP)
    if missing := measure.vllm_missing():
        return skipped(missing)
    from harness.checks.dynamic import Unavailable, dynamic_run

    run = dynamic_run(ctx)
    reference = None if isinstance(run, Unavailable) else _text_rows(run)
    prompts = None if reference is None else reference[0]
    ctx.say("serving the adapter in a vLLM engine (a process of its own, shared by the run's adapters)")
    outcome = ctx.cached("serving.vllm", lambda: measure.serve(ctx.base.base_dir, ctx.adapter.root, prompts,
                                                               siblings=ctx.run_adapters))
    details = {"vllm": outcome.vllm_version, "seconds": outcome.seconds}
    if outcome.refusals:
        rules = [r.message for r in outcome.refusals]
        return failed(f"vLLM {outcome.vllm_version} refuses this adapter at its default settings: {' '.join(rules)}",
                      fix="; ".join(r.fix for r in outcome.refusals), refusals=rules, **details)
    if outcome.error:
        return failed(f"vLLM {outcome.vllm_version or ''} admits the adapter but cannot serve it: {outcome.error}",
                      fix="target only modules vLLM supports LoRA on for this architecture (its message lists them) "
                      "and leave out weights it cannot load (trainable tokens, full copies), or merge the adapter "
                      "(merge_and_unload) and serve the merged model without --enable-lora", **details)
    if reference is None:
        return skipped(f"vLLM {outcome.vllm_version} admits the adapter; its logprobs are not compared: {run.reason}",
                       **details)
    if outcome.unsupported:
        return skipped(f"{outcome.unsupported}: vLLM does not serve this architecture", **details)
    _, ref_rows, base_rows = reference
    gap = measure.logprob_gap(outcome.served, ref_rows)
    base_gap = measure.logprob_gap(outcome.served, base_rows)
    details.update(max_logprob_gap=gap.gap, tolerance=measure.LOGPROB_ATOL, gap_to_base=base_gap.gap,
                   prompts=len(prompts), positions=sum(map(len, prompts)))
    if gap.gap > measure.LOGPROB_ATOL:
        nothing = base_gap.gap <= measure.LOGPROB_ATOL
        hint = (": vLLM served the base model's logprobs, so it loaded the adapter and applied it to nothing (module "
                "names under a prefix vLLM's model class does not use?)" if nothing else "")
        fix = ("save the adapter with the module names of the class vLLM serves (for a multimodal wrapper, its "
               "language model's prefix), or serve the merged model" if nothing else
               "vLLM applies every tensor in the adapter file, PEFT only what the config names: see key-coverage for "
               "tensors PEFT leaves out and remove them or name them in target_modules; or merge the adapter "
               "(merge_and_unload) and serve the merged model without --enable-lora")
        return failed(f"vLLM {outcome.vllm_version} serves the adapter differently from the fp32 reference: largest "
                      f"logprob gap {gap.gap:.3g} (token {gap.token_id} after {gap.position + 1} tokens of probe row "
                      f"{gap.prompt}: vLLM {gap.served:.4f}, reference {gap.reference:.4f}; tolerance "
                      f"{measure.LOGPROB_ATOL:g}){hint}", fix=fix, **details)
    return passed(f"vLLM {outcome.vllm_version} serves the adapter as the fp32 reference: prompt logprobs within "
                  f"{gap.gap:.2g} (tolerance {measure.LOGPROB_ATOL:g}) on {len(prompts)} probe rows", **details)


register(
    id="serving-vllm",
    group="serving",
    summary="an adapter vLLM refuses at deploy time (its admission rules), or serves differently from the fp32 "
    "reference (loaded and applied to nothing, rows dropped)",
    why="vLLM refuses many adapters PEFT loads (rank above --max-lora-rank, modules_to_save, lora bias, DoRA), with "
    "messages users meet only when they deploy; and it can load an adapter and apply it to nothing",
    fix="follow the fix named with vLLM's message; for an adapter served differently, serve the merged model",
)(check_serving_vllm)


def _text_rows(run):
    """The text probe's rows as token-id lists (padding dropped), with the reference's and the base's logits."""
    probe = run.text_probe
    prompts, ref_rows, base_rows = [], [], []
    for b in range(probe.input_ids.shape[0]):
        real = probe.attention_mask[b].bool().cpu()
        prompts.append([int(i) for i in probe.input_ids[b].cpu()[real]])
        ref_rows.append(run.text_reference_logits[b].cpu()[real])
        base_rows.append(run.text_base_logits[b].cpu()[real])
    return prompts, ref_rows, base_rows
