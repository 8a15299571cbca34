"""The model zoo (``fixtures/zoo.py``) through ``harness.check``: layer kinds beyond plain Llama-like decoders.

Every architecture × adapter kind with its official-recipe merge must pass with exit code 0; every broken merge
must fail ``merged-matches`` naming what is wrong. The focused tests pin one harness behaviour each: Conv1D
weights, a Conv1D config with ``fan_in_fan_out=false``, ``modules_to_save``, embedding LoRA, tied embeddings,
NaN in an adapter, and tensors for modules ``target_modules`` does not name.

Only the stable interface is used: ``harness.check(adapter, base_model=..., merged=...)`` and the Report
(``exit_code``, ``checks``, ``get(id)`` with ``status``/``message``/``details``). Architectures the installed
transformers lacks (4.33 has gpt2, llama, gpt_neox, falcon, gptj, opt, bloom) are skipped with the reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import pytest

import harness
from fixtures import zoo
from fixtures.judging import only_transformers_dora_failure

OK = ("pass", "warn", "skip")
PLACEHOLDER = re.compile(r"\b(?:none row|batch -1|position -1)\b")


def _arch_param(name: str, *rest, id_suffix: str = "", kind: str | None = None, slow: bool = False):
    """A parameter that skips with the reason when this stack lacks the architecture or the adapter kind's
    PEFT feature (lora_bias, DoRA); ``slow``: in the slow tier (``-m slow``, run by .ci/run)."""
    reason = zoo.arch_unavailable(name) or (zoo.feature_unavailable(kind) if kind else None)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    marks += [pytest.mark.slow] if slow else []
    return pytest.param(name, *rest, id=f"{name}{id_suffix}", marks=marks)


@pytest.fixture(scope="module", autouse=True)
def quiet_process():
    """Each harness.check loads ~10 tiny models: at these sizes the time goes to intra-op thread hand-offs (two
    xdist workers on two shared cores) and to the engine's ``gc.collect()`` walking every object the imports made.
    One torch thread per worker, and the objects alive before the first check frozen out of the collector (they
    are module-level state; freed garbage still goes by refcount), make a check ~5x cheaper. Restored afterwards."""
    import gc

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _harness_digest() -> str:
    """The harness's own sources: a stored report is reused only by the code that wrote it."""
    root = Path(harness.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def run(synthetic_cache):
    """``run(adapter, base, merged=None, only=())`` → the Report of one ``harness.check`` (in-process), computed once
    per test session and shared by every test and xdist worker that asks for the same inputs (stored as JSON next to
    the zoo builds, keyed by the inputs and the harness sources)."""
    from harness.report import Report
    from harness.synthetic.cache import cached_build

    def check(adapter: Path, base: Path, merged: Path | None = None, only: tuple[str, ...] = ()):
        params = {"adapter": str(adapter), "base": str(base), "merged": str(merged) if merged else None,
                  "only": list(only), "harness": _harness_digest()}

        def build(out: Path) -> None:
            report = harness.check(adapter, base_model=base, merged=merged, only=only, isolated=False)
            (out / "report.json").write_text(json.dumps(report.to_dict()))

        stored = cached_build(synthetic_cache, "zoo-report", params, build)
        return Report.from_dict(json.loads((stored / "report.json").read_text()))

    return check


def failing(report) -> str:
    lines = [f"{c.id}: {c.status}: {c.message}" for c in report.checks if c.status not in OK]
    return "\n".join(lines) or "(no failing check)"


def verdict(report, check_id: str) -> tuple[str, str]:
    result = report.get(check_id)
    return result.status, result.message


def expect(problems: list[str]) -> None:
    """Fail once with every wrong verdict of a test (the to-do list), not only the first."""
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def zoo_arch(synthetic_cache):
    """``zoo_arch(name)`` → the built (cached) ``ZooArch``: base, adapters, merges, broken merges."""
    return lambda name: zoo.build_arch(name, synthetic_cache)


@pytest.fixture(scope="session")
def derived(synthetic_cache):
    """``derived(name)`` → (``ZooArch``, adapter dir) of a focused test's adapter (``zoo.DERIVED``)."""
    return lambda name: zoo.derived_adapter(name, synthetic_cache)


def head_names(built: zoo.ZooArch) -> set[str]:
    """The LM head's module name and its key in the checkpoint (they differ: GPT-NeoX lm_head / embed_out)."""
    return {built.info["head_module"], built.info["head_key"].removesuffix(".weight")}


def _recipe_unties(built: zoo.ZooArch) -> bool:
    """Whether this stack's official merge wrote ``tie_word_embeddings: false`` for the trained tied head."""
    return built.info["merged_tie_word_embeddings"]["modules_to_save"] is False


# ---------------------------------------------------------------------------------------------
# Every architecture × adapter kind, official merge: no check may fail


# Embedding LoRA on tied embeddings cannot be merged faithfully: test_tied_embedding_lora_merge_is_reported.
# The fast tier keeps a Linear and a Conv1D architecture end to end; every other pair runs in the slow tier.
FAST_GOOD_CASES = {("llama", "plain"), ("gpt2", "plain")}
GOOD_CASES = [_arch_param(name, kind, id_suffix=f"-{kind}", kind=kind, slow=(name, kind) not in FAST_GOOD_CASES)
              for name in zoo.ARCHS for kind in zoo.suite_kinds(name)
              if not (kind == "embedding" and zoo.ARCHS[name].tied)]


@pytest.mark.parametrize(("arch", "kind"), GOOD_CASES)
def test_good_adapter_and_official_merge_pass(run, zoo_arch, arch, kind):
    built = zoo_arch(arch)
    if built.tied and kind == "modules_to_save" and not _recipe_unties(built):
        pytest.skip("this stack's merge keeps tie_word_embeddings on, so the trained head is lost on reload: "
                    "test_tied_head_recipe_that_keeps_tying_fails")
    report = run(built.adapter(kind), built.base, built.merged(kind))
    code = report.exit_code
    if kind == "dora" and code and only_transformers_dora_failure(report):
        return  # transformers' PEFT integration drops DoRA magnitudes: a real failure, reported on that path alone
    assert code == 0, f"{arch}/{kind}: exit code {code}, failing checks:\n{failing(report)}"



# ---------------------------------------------------------------------------------------------
# Broken merges: merged-matches fails and names the problem


BROKEN_CASES = [_arch_param(name, broken, id_suffix=f"-{broken}", kind=zoo.BROKEN_MERGES[broken].adapter)
                for broken, names in zoo.BROKEN_ARCHS.items() for name in names]


def _expected_in_message(built: zoo.ZooArch, broken: str) -> list[str]:
    """Substrings (any of them) that name the problem in merged-matches' message."""
    if broken == "mis-scaled":
        return ["s·B·A", "mis-scaled", "scaled", "ΔW"]
    touched = built.info["broken"][broken][0]  # e.g. model.layers.1.self_attn.q_proj.weight
    return [touched.removesuffix(".weight")]


@pytest.mark.parametrize(("arch", "broken"), BROKEN_CASES)
def test_broken_merge_fails_merged_matches(run, zoo_arch, arch, broken):
    built = zoo_arch(arch)
    spec = zoo.BROKEN_MERGES[broken]
    report = run(built.adapter(spec.adapter), built.base, built.broken(broken), only=("merged-matches",))
    status, message = verdict(report, "merged-matches")
    assert status == "fail", f"{arch}/{broken} ({spec.what}): merged-matches {status}: {message}"
    wanted = _expected_in_message(built, broken)
    assert any(w in message for w in wanted), f"merged-matches does not name {' / '.join(wanted)}: {message}"
    if broken == "layer-skipped":
        assert "not merged" in message, message
    details = report.get("merged-matches").details
    field = BROKEN_DETAIL[broken]
    touched = built.info["broken"][broken]
    named = " ".join(details[field])
    assert details[field] and (broken == "mis-scaled" or any(key in named for key in touched)), (field, details)


# The structured field of merged-matches' details that must list each broken merge's tensors.
BROKEN_DETAIL = {"mis-scaled": "wrong_delta", "layer-skipped": "unmerged", "modules-to-save-dropped": "copies_dropped",
                 "embedding-delta-dropped": "unmerged", "lora-bias-dropped": "unmerged",
                 "tokens-dropped": "tokens_dropped", "tokens-wrong-rows": "tokens_wrong"}


# ---------------------------------------------------------------------------------------------
# Focused tests, one per known wrong verdict


def test_conv1d_base_match_reads_weights_as_in_out(run, zoo_arch):
    """GPT-2's Conv1D stores weight [in, out]: every adapted module exists with matching dimensions."""
    built = zoo_arch("gpt2")
    report = run(built.adapter("plain"), built.base, built.merged("plain"))
    status, message = verdict(report, "base-match")
    assert status == "pass", message
    assert report.get("base-match").details["layer_kinds"] == {"conv1d": sum(map(len, built.info["targets"].values()))}


def test_conv1d_adapter_read_as_linear_fails_base_match(run, derived):
    """The broken case: an adapter whose c_attn LoRA was made for a [out, in] reading of the Conv1D weight."""
    built, adapter = derived("conv1d-read-as-linear")
    result = run(adapter, built.base, only=("base-match",)).get("base-match")
    assert result.status == "fail", result.message
    assert any(m.startswith(f"{zoo.SWAPPED_MODULE}: base transformers Conv1D in/out 32/96")
               for m in result.details["mismatched"]), result.details


def test_conv1d_config_fan_in_fan_out_false_is_corrected_like_peft(run, derived):
    """fan_in_fan_out=false on Conv1D: PEFT warns and uses True, so every path is right; the harness must agree
    (nothing fails) and warn, saying what PEFT does."""
    built, adapter = derived("conv1d-fan-in-fan-out-false")
    report = run(adapter, built.base, built.merged("plain"))
    problems = [f"{c.id}: {c.status}: {c.message}" for c in report.checks if c.status not in OK]
    warnings = [c.message for c in report.checks if c.status == "warn" and "fan_in_fan_out" in c.message]
    if not warnings:
        problems.append("no warning names fan_in_fan_out")
    elif not any("true" in m.lower() for m in warnings):
        problems.append(f"the fan_in_fan_out warning does not say PEFT sets it to True: {warnings}")
    corrected = report.get("base-match").details.get("fan_in_fan_out_corrected") or {}
    if sum(len(modules) for modules in corrected.values()) == 0:
        problems.append(f"base-match details list no corrected module: {corrected}")
    expect(problems)


@pytest.mark.parametrize("arch", [_arch_param("llama"), _arch_param("gpt_neox")])
def test_modules_to_save_head_is_part_of_the_merge(run, zoo_arch, arch):
    """A trained head (modules_to_save) is part of the merge: the correct merge passes, one without it fails."""
    built = zoo_arch(arch)
    heads = head_names(built)
    problems = []
    status, message = verdict(run(built.adapter("modules_to_save"), built.base, built.merged("modules_to_save")),
                              "merged-matches")
    if status != "pass":
        problems.append(f"the correct merge: merged-matches {status}: {message}")
    status, message = verdict(run(built.adapter("modules_to_save"), built.base, built.broken("modules-to-save-dropped"),
                                  only=("merged-matches",)), "merged-matches")
    if status != "fail" or not any(h in message for h in heads):
        problems.append(f"a merge without the trained {' / '.join(sorted(heads))}: merged-matches {status}: {message}")
    expect(problems)


@pytest.mark.parametrize("arch", [_arch_param("llama"), _arch_param("gptj")])
def test_embedding_lora_has_a_measurable_effect(run, zoo_arch, arch):
    """LoRA on the input embedding acts on token ids: probes fed as inputs_embeds from the base never see it."""
    built = zoo_arch(arch)
    report = run(built.adapter("embedding"), built.base, built.merged("embedding"))
    expect([f"{check_id}: {status}: {message}"
            for check_id in ("effect", "merge-equivalence", "path-agreement", "merged-matches")
            for status, message in [verdict(report, check_id)] if status != "pass"])


@pytest.mark.parametrize("arch", [_arch_param("opt"), _arch_param("gemma2")])
def test_tied_embeddings_modules_to_save_untie_on_merge_passes(run, zoo_arch, arch):
    """Tied embeddings + modules_to_save=[lm_head]: the merge unties (config and a separate lm_head.weight)."""
    built = zoo_arch(arch)
    if not _recipe_unties(built):
        pytest.skip("this stack's merge_and_unload keeps tie_word_embeddings on: "
                    "test_tied_head_recipe_that_keeps_tying_fails")
    report = run(built.adapter("modules_to_save"), built.base, built.merged("modules_to_save"))
    code = report.exit_code
    assert code == 0, f"exit code {code}, failing checks:\n{failing(report)}"


@pytest.mark.parametrize("arch", [_arch_param("opt"), _arch_param("bloom")])
def test_tied_head_recipe_that_keeps_tying_fails(run, zoo_arch, arch):
    """peft 0.8.2 (transformers 4.33) merges a trained tied head but leaves tie_word_embeddings on: the saved
    lm_head.weight is re-tied to the embedding on reload and the trained head is silently lost."""
    built = zoo_arch(arch)
    if _recipe_unties(built):
        pytest.skip("this stack's merge_and_unload unties the head (tie_word_embeddings=false)")
    report = run(built.adapter("modules_to_save"), built.base, built.merged("modules_to_save"))
    heads = head_names(built)
    problems = []
    status, message = verdict(report, "reload-roundtrip")
    if status != "fail":
        problems.append(f"reload-roundtrip {status}: {message}")
    status, message = verdict(report, "merged-matches")
    if status != "fail" or not any(h in message for h in heads) or "tie" not in message.lower():
        problems.append(f"merged-matches must fail naming {' / '.join(sorted(heads))} and the tie: {status}: {message}")
    if not report.get("merged-matches").details.get("ties"):
        problems.append("merged-matches details list no tie problem")
    expect(problems)


@pytest.mark.parametrize("arch", [_arch_param("gpt2"), _arch_param("opt"), _arch_param("gemma2")])
def test_tied_embedding_lora_merge_is_reported(run, zoo_arch, arch):
    """LoRA on a tied input embedding: unmerged, only the input side sees ΔE; merged into the shared weight, the
    LM head changes too. Merged and unmerged outputs differ, and the report must say why (the tie)."""
    built = zoo_arch(arch)
    report = run(built.adapter("embedding"), built.base, built.merged("embedding"))
    status, message = verdict(report, "merge-equivalence")
    assert status == "fail" and "tie" in message.lower(), f"merge-equivalence {status}: {message}"
    assert "tied" in (report.get("merge-equivalence").details["peft-merged"]["cause"] or "")
    assert report.get("merge-equivalence").details["peft"]["ok"]  # unmerged PEFT agrees with the reference
    assert report.get("merged-matches").status == "fail" and report.get("merged-matches").details["ties"]


def test_nan_in_one_lora_tensor_is_loaded_and_non_finite(run, derived):
    """A NaN in one lora_B: the key loads (it is not 'not loaded'); outputs are non-finite and the checks say so,
    naming the first module that produces them."""
    built, adapter = derived("nan-in-lora-b")
    report = run(adapter, built.base)
    problems = []
    status, message = verdict(report, "key-coverage")
    if status not in OK or "not loaded" in message or report.get("key-coverage").details.get("not_loaded"):
        problems.append(f"key-coverage {status}: {message}")
    if zoo.NAN_MODULE not in (report.get("effect").details.get("non_finite") or ""):
        problems.append(f"effect details do not name {zoo.NAN_MODULE}: {report.get('effect').details}")
    for check_id in ("effect", "merge-equivalence", "path-agreement"):
        status, message = verdict(report, check_id)
        if status != "fail" or "non-finite" not in message or zoo.NAN_MODULE not in message:
            problems.append(f"{check_id} must fail with 'non-finite' naming {zoo.NAN_MODULE}: {status}: {message}")
    problems += [f"{c.id}: placeholder position: {c.message}" for c in report.checks if PLACEHOLDER.search(c.message)]
    expect(problems)


def test_tensors_for_untargeted_modules_have_no_effect(run, derived):
    """Tensors for v_proj in an adapter whose target_modules names only q_proj: PEFT drops them all (q_proj gets a
    zero-initialised LoRA), so the adapter does nothing and effect must not pass."""
    built, adapter = derived("untargeted-tensors")
    report = run(adapter, built.base)
    status, message = verdict(report, "effect")
    assert status == "fail", f"effect {status}: {message}"
    assert report.get("effect").details["relative_effect"] == {"image": 0.0, "text": 0.0}


# ---------------------------------------------------------------------------------------------
# Trainable tokens (trainable_token_indices, peft >= 0.15): rows of the input embedding replaced


@pytest.mark.parametrize("arch", [_arch_param("llama", kind="tokens"), _arch_param("opt", kind="tokens")])
def test_trainable_tokens_are_applied_and_merged(run, zoo_arch, arch):
    """The saved rows are the new values of those embedding rows (a tied head shares them): the reference applies
    them, so every path agrees with it, and merged-matches expects them in the merged embedding (the same report as
    test_good_adapter_and_official_merge_pass: cached, no extra run)."""
    built = zoo_arch(arch)
    report = run(built.adapter("tokens"), built.base, built.merged("tokens"))
    problems = [f"{check_id}: {status}: {message}"
                for check_id in ("shapes", "base-match", "effect", "path-agreement", "merge-equivalence",
                                 "merged-matches")
                for status, message in [verdict(report, check_id)] if status != "pass"]
    details = report.get("merged-matches").details
    if details["ignored_adapter_tensors"]:
        problems.append(f"merged-matches ignores adapter tensors: {details['ignored_adapter_tensors']}")
    if details["ties"] or details["untie_expected"]:
        problems.append(f"a tied head shares the trained rows (PEFT ties its token adapter): {details}")
    if report.get("shapes").details.get("trainable_tokens") != 1:
        problems.append(f"shapes does not count the token adapter: {report.get('shapes').details}")
    expect(problems)


def test_trainable_tokens_alone_have_a_measured_effect(run, derived):
    """Every lora_B zero: only the rows of ids 3, 5, 7 change the model, and the probes must hold those ids."""
    if reason := zoo.feature_unavailable("tokens"):
        pytest.skip(reason)
    built, adapter = derived("tokens-only")
    result = run(adapter, built.base, only=("effect",)).get("effect")
    assert result.status == "pass", result.message
    assert result.details["relative_effect"]["text"] > 0.01, result.details


def test_trainable_tokens_delta_of_the_wrong_shape_fails_shapes(run, derived):
    """One row more than trainable_token_indices has: shapes fails naming the embedding and the expected shape."""
    if reason := zoo.feature_unavailable("tokens"):
        pytest.skip(reason)
    built, adapter = derived("tokens-wrong-shape")
    result = run(adapter, built.base, only=("shapes",)).get("shapes")
    module = built.info["embedding_module"]
    assert result.status == "fail", result.message
    assert any(p.startswith(f"{module}: trainable_tokens_delta [4, 32], expected [3, 32]")
               for p in result.details["problems"]), result.details
