"""The static checks run in-process on tiny adapter directories written here (milliseconds each): every branch's
verdict, the message a user reads, the fix and the details keys. Written to kill the mutants of
``harness/checks/static.py`` that the end-to-end tests (``test_hostile.py``, ``test_inputs.py``) would catch only
in minutes, or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version
from safetensors.torch import save_file

from harness import compat
from harness.checks import static
from harness.checks.context import CheckContext
from harness.compat import PEFT_VERSION
from harness.inputs.adapter_dir import read_adapter

# Written against the current stack's behaviour (the mutation run's); the oldest stack differs in the marked tests:
# PEFT 0.8.2 refuses config fields it does not know and has no DoRA, transformers 4.33 keeps or omits the tie flag.
OLDEST_STACK = Version(str(compat.PEFT_VERSION)) < Version("0.14")
CURRENT_STACK_ONLY = pytest.mark.skipif(OLDEST_STACK, reason=f"PEFT {compat.PEFT_VERSION}: the oldest stack behaves "
                                        "differently here (see OLDEST_STACK)")

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
INSTALLED = str(PEFT_VERSION)


def lora(module: str, r: int = 2, fan_in: int = 4, out: int = 3, *, b_value: float = 1.0) -> dict:
    """A Linear module's LoRA pair: A [r, in], B [out, r]."""
    return {f"{P}{module}.lora_A.weight": torch.ones(r, fan_in),
            f"{P}{module}.lora_B.weight": torch.full((out, r), b_value)}


def write(root: Path, tensors: dict | None = None, config: dict | None = CONFIG, *,
          name: str = "adapter_model.safetensors", bin_tensors: dict | None = None, model_config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "adapter_config.json").write_text(json.dumps(config))
    if model_config is not None:
        (root / "config.json").write_text(json.dumps(model_config))
    if tensors is not None:
        save_file(tensors, str(root / name))
    if bin_tensors is not None:
        torch.save(bin_tensors, root / "adapter_model.bin")
    return root


def ctx_of(root: Path, **kw) -> CheckContext:
    return CheckContext(adapter=read_adapter(root, **kw))


def make(tmp_path: Path, tensors: dict | None = None, config: dict | None = CONFIG, **kw) -> CheckContext:
    """An adapter directory under ``tmp_path/a`` (no safetensors file when ``tensors`` is None), read."""
    return ctx_of(write(tmp_path / "a", tensors, config, **kw))


def good(tmp_path: Path, config: dict | None = CONFIG) -> CheckContext:
    return make(tmp_path, {**lora(Q), **lora(V)}, config)


def verdict(result):
    return result.status, result.message


# -- config-valid ----------------------------------------------------------------------------------


def cfg_ctx(config=None, *, error=None, path=None, foreign=(), primary=None) -> CheckContext:
    adapter = SimpleNamespace(config=config, config_error=error, config_path=path,
                              foreign_files=list(foreign), primary=primary)
    return CheckContext(adapter=adapter)


def test_config_missing_next_to_model_weights_says_it_is_not_an_adapter():
    got = static.check_config_valid(cfg_ctx(error="E", foreign=[object()]))
    assert verdict(got) == ("fail", "no adapter_config.json: this directory is not a PEFT adapter (see full-checkpoint)")
    assert got.fix == ("pass the directory written by peft_model.save_pretrained(); for a merged model use --merged "
                       "together with --base-model and --adapter")
    assert got.details == {"error": "E"}


def test_config_missing_or_unreadable_names_the_error():
    got = static.check_config_valid(cfg_ctx(error="adapter_config.json: bad JSON"))
    assert verdict(got) == ("fail", "adapter_config.json: bad JSON")
    assert got.fix == ("copy the adapter_config.json written by save_pretrained next to the weights (PEFT cannot build "
                       "the LoRA layers without it)")
    assert got.details == {"error": "adapter_config.json: bad JSON"}
    bare = static.check_config_valid(cfg_ctx())
    assert verdict(bare) == ("fail", "adapter_config.json missing") and bare.details == {"error": None}
    # a config file that exists but did not parse, next to model weights: still the unreadable-config message
    parsed = static.check_config_valid(cfg_ctx(error="bad", path=Path("x"), foreign=[object()]))
    assert parsed.message == "bad"


@pytest.mark.parametrize(("drop", "missing"), [
    (("peft_type",), ["peft_type"]), (("r", "lora_alpha"), ["r", "lora_alpha"]),
    (("target_modules",), ["target_modules"]), (("peft_type", "target_modules"), ["peft_type", "target_modules"]),
])
def test_missing_required_fields_are_listed(drop, missing):
    config = {k: v for k, v in CONFIG.items() if k not in drop}
    got = static.check_config_valid(cfg_ctx(config))
    assert verdict(got) == ("fail", f"adapter_config.json lacks required field(s): {', '.join(missing)}")
    assert got.fix == ("regenerate adapter_config.json with save_pretrained (it writes every field) instead of "
                       "editing it by hand")
    assert got.details == {"missing": missing}


def test_null_fields_and_empty_targets_count_as_missing_but_target_parameters_do_not():
    got = static.check_config_valid(cfg_ctx({**CONFIG, "r": None, "target_modules": []}))
    assert got.details == {"missing": ["r", "target_modules"]}
    params = {**CONFIG, "target_modules": None, "target_parameters": ["mlp.experts.w"]}
    assert static.check_config_valid(cfg_ctx(params)).status != "fail" or "lacks" not in \
        static.check_config_valid(cfg_ctx(params)).message


@pytest.mark.parametrize("peft_type", ["lora", "Lora"])
def test_peft_type_in_the_wrong_case(peft_type):
    got = static.check_config_valid(cfg_ctx({**CONFIG, "peft_type": peft_type}))
    assert verdict(got) == ("fail", f"peft_type is {peft_type!r}, not exactly 'LORA': PeftConfig.from_pretrained "
                                    "cannot find its config class")
    assert got.fix == 'write "peft_type": "LORA" (upper case) in adapter_config.json'
    assert got.details == {"peft_type": peft_type}


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", 7, "LORAX"])
def test_another_peft_method(peft_type):
    got = static.check_config_valid(cfg_ctx({**CONFIG, "peft_type": peft_type}))
    assert verdict(got) == ("fail", f"peft_type is {peft_type!r}: this harness checks LoRA adapters (peft_type LORA)")
    assert got.fix == "use a LoRA adapter, or a tool made for this PEFT method"
    assert got.details == {"peft_type": peft_type}


def test_value_problems_are_counted_and_fields_sorted():
    got = static.check_config_valid(cfg_ctx({**CONFIG, "r": 0, "lora_alpha": -1, "bias": "x"}))
    assert verdict(got) == ("fail", "adapter_config.json: r must be a positive integer, not 0 (+2 more)")
    assert got.fix == static._config_fix([static.ConfigProblem("r", "")])
    assert got.details == {
        "problems": ["r must be a positive integer, not 0",
                     "lora_alpha is negative (-1): the LoRA scaling alpha/r must be positive",
                     "bias must be 'none', 'all' or 'lora_only', not 'x'"],
        "fields": ["bias", "lora_alpha", "r"]}
    one = static.check_config_valid(cfg_ctx({**CONFIG, "r": 0}))
    assert one.message == "adapter_config.json: r must be a positive integer, not 0"


def test_a_costly_regex_gets_the_regex_fix():
    got = static.check_config_valid(cfg_ctx({**CONFIG, "target_modules": "(([a-z0-9_.]|[a-z0-9_.])+)+#"}))
    assert got.status == "fail" and got.message.startswith("adapter_config.json: ")
    assert got.fix.startswith("write target_modules as a list of module names")
    assert got.details["fields"] == ["target_modules"]


def test_costly_regex_is_timed_on_the_adapters_own_module_names(tmp_path):
    # matches only a name that the adapter holds, after a long run of characters: costly only there
    names = static._module_names(good(tmp_path))
    assert names[: len(static.PROBE_NAMES)] == list(static.PROBE_NAMES)
    assert names[len(static.PROBE_NAMES):] == [Q, V]
    assert static._module_names(cfg_ctx(CONFIG)) == list(static.PROBE_NAMES)
    assert static._module_names(CheckContext()) == list(static.PROBE_NAMES)


def test_pattern_problems_name_the_field_and_the_problem():
    found = static._pattern_problems({**CONFIG, "target_modules": "(", "rank_pattern": {"q_proj": 4}}, ["a.q_proj"])
    assert [p.field for p in found] == ["target_modules"] and all(p.regex for p in found)
    assert "(" in found[0][1]
    costly = static._pattern_problems({**CONFIG, "target_modules": "(([a-z0-9_.]|[a-z0-9_.])+)+#"},
                                      list(static.PROBE_NAMES))
    assert [p.field for p in costly] == ["target_modules"] and "costly" in costly[0].text
    assert static._pattern_problems(CONFIG, list(static.PROBE_NAMES)) == []


def test_scalar_problems_for_targets_bias_and_pattern_tables():
    def fields(**changes):
        return [(p.field, p.text) for p in static._scalar_problems({**CONFIG, **changes})]

    assert fields() == []
    assert fields(target_modules=None, bias="all", rank_pattern=None) == []
    assert fields(target_modules="q_proj", bias="lora_only") == []
    bad_targets = "target_modules must be a non-empty list of names or a regex string, not "
    assert fields(target_modules="") == [("target_modules", bad_targets + "''")]
    assert fields(target_modules=[]) == [("target_modules", bad_targets + "[]")]
    assert fields(target_modules=["q", 3]) == [("target_modules", bad_targets + "['q', 3]")]
    assert fields(target_modules=5) == [("target_modules", bad_targets + "5")]
    assert fields(bias=None) == [("bias", "bias must be 'none', 'all' or 'lora_only', not None")]
    assert static._scalar_problems({"r": 2, "lora_alpha": 4}) == []
    assert fields(rank_pattern=[1]) == [("rank_pattern", "rank_pattern must map module patterns to numbers, not [1]")]
    assert fields(alpha_pattern="x") == [("alpha_pattern", "alpha_pattern must map module patterns to numbers, not 'x'")]
    assert fields(rank_pattern={"q": 0, "v": 4}, alpha_pattern={"k": 0}) == [
        ("rank_pattern", "rank_pattern['q'] must be a positive integer, not 0"),
        ("alpha_pattern", "alpha_pattern['k'] is 0: the LoRA scaling is zero, the adapter does nothing")]
    assert fields(r=None, lora_alpha=None) == [
        ("r", "r must be a positive integer, not None"), ("lora_alpha", "lora_alpha must be a number, not None")]


def test_rank_and_alpha_messages_at_their_bounds():
    assert static._rank_problem("r", True) == "r must be a positive integer, not True"
    assert static._rank_problem("r", -3) == "r must be a positive integer, not -3"
    assert static._alpha_problem("a", float("nan")) == "a is nan, not a finite number"
    assert static._alpha_problem("a", 1_000_000.5) == (
        "a is 1000000.5, over 1,000,000: the scaling alpha/r would swamp the base weights")
    assert static._alpha_problem("a", 0.0) == "a is 0: the LoRA scaling is zero, the adapter does nothing"
    assert static._alpha_problem("a", -0.5) == "a is negative (-0.5): the LoRA scaling alpha/r must be positive"
    assert static._is_number(1) and static._is_number(1.5)
    assert not static._is_number(True) and not static._is_number("1") and not static._is_number(None)


@CURRENT_STACK_ONLY
def test_a_good_config_passes_with_its_summary():
    got = static.check_config_valid(cfg_ctx(CONFIG))
    assert verdict(got) == ("pass", "LoRA config: r=2, lora_alpha=4, 2 target pattern(s)")
    assert got.details == {"peft_version_written": None, "peft_version_installed": INSTALLED}
    full = {**CONFIG, "target_modules": "q_proj", "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8},
            "use_rslora": True, "use_dora": True, "peft_version": "0.1.0"}
    got = static.check_config_valid(cfg_ctx(full))
    assert verdict(got) == ("pass", "LoRA config: r=2, lora_alpha=4, 1 target pattern(s), rank_pattern, alpha_pattern, "
                                    "rsLoRA, DoRA")
    assert got.details == {"peft_version_written": "0.1.0", "peft_version_installed": INSTALLED}
    params = {**CONFIG, "target_modules": None, "target_parameters": ["mlp.experts.w1", "mlp.experts.w2"]}
    assert static.check_config_valid(cfg_ctx(params)).message == "LoRA config: r=2, lora_alpha=4, 2 target pattern(s)"


def _peft_raises(monkeypatch, err: Exception) -> None:
    import peft

    def refuse(**kwargs):
        raise err

    monkeypatch.setattr(peft.PeftConfig, "from_peft_type", refuse)


@CURRENT_STACK_ONLY
def test_an_older_peft_refusing_unknown_fields(monkeypatch):
    _peft_raises(monkeypatch, TypeError("__init__() got an unexpected keyword argument 'zz_new'"))
    config = {**CONFIG, "zz_new": 1, "aa_new": None, "peft_version": "9.1"}
    got = static.check_config_valid(cfg_ctx(config))
    assert verdict(got) == ("fail", f"PEFT {INSTALLED} cannot read this config: it raises TypeError on the field(s) it "
                                    "does not know: aa_new, zz_new (written by PEFT 9.1, PEFT before about 0.14 "
                                    "refuses unknown fields even at default values)")
    assert got.fix == ("install peft>=9.1 to load this adapter as trained, or delete the unknown fields from a copy "
                       "of adapter_config.json if they are all at their defaults")
    assert got.details == {"unknown_fields": {"zz_new": 1, "aa_new": None}, "peft_version_written": "9.1",
                           "peft_version_installed": INSTALLED}
    anon = static.check_config_valid(cfg_ctx({**CONFIG, "zz_new": 1}))
    assert anon.message.endswith("zz_new (PEFT before about 0.14 refuses unknown fields even at default values)")
    assert anon.fix.startswith("install the PEFT version that wrote this adapter, or delete")


def test_other_type_errors_and_exceptions_are_peft_rejections(monkeypatch):
    _peft_raises(monkeypatch, TypeError("unexpected keyword argument 'zz'"))
    got = static.check_config_valid(cfg_ctx(CONFIG))  # no unknown field: not the version story
    assert verdict(got) == ("fail", f"PEFT {INSTALLED} rejects this config: unexpected keyword argument 'zz'")
    assert got.details == {"exception": "TypeError"}
    _peft_raises(monkeypatch, TypeError("bad value"))
    got = static.check_config_valid(cfg_ctx({**CONFIG, "zz_new": 1}))
    assert verdict(got) == ("fail", f"PEFT {INSTALLED} rejects this config: bad value")
    _peft_raises(monkeypatch, ValueError("r too odd"))
    got = static.check_config_valid(cfg_ctx(CONFIG))
    assert verdict(got) == ("fail", f"PEFT {INSTALLED} rejects this config: r too odd")
    assert got.details == {"exception": "ValueError"}


def test_peft_is_given_the_whole_config(monkeypatch):
    import peft

    seen = {}
    monkeypatch.setattr(peft.PeftConfig, "from_peft_type", lambda **kw: seen.update(kw))
    assert static.check_config_valid(cfg_ctx(CONFIG)).status == "pass"
    assert seen == CONFIG


@CURRENT_STACK_ONLY
def test_the_real_peft_rejects_an_invalid_combination():
    got = static.check_config_valid(cfg_ctx({**CONFIG, "use_dora": True, "use_qalora": True, "lora_bias": True}))
    assert got.status == "fail" and got.message.startswith(f"PEFT {INSTALLED} rejects this config: ")
    assert "\n" not in got.message


@CURRENT_STACK_ONLY
def test_unknown_fields_with_values_fail_and_at_defaults_warn():
    config = {**CONFIG, "zz_switch": True, "aa_empty": {"x": []}, "peft_version": "9.0", "revision": "main"}
    got = static.check_config_valid(cfg_ctx(config))
    assert verdict(got) == ("fail", f"field(s) unknown to the installed PEFT {INSTALLED} with non-default values: "
                                    f"zz_switch (written by PEFT 9.0, PEFT {INSTALLED} drops them silently, so the "
                                    "adapter would not behave as trained)")
    assert got.fix == "install peft>=9.0 to load this adapter as trained"
    assert got.details == {"unknown_fields": {"zz_switch": True, "aa_empty": {"x": []}}, "peft_version_written": "9.0",
                           "peft_version_installed": INSTALLED}
    two = static.check_config_valid(cfg_ctx({**CONFIG, "zz_b": 1, "zz_a": "on"}))
    assert "non-default values: zz_a, zz_b (PEFT" in two.message
    calm = static.check_config_valid(cfg_ctx({**CONFIG, "zz_b": None, "zz_a": False, "peft_version": "9.0"}))
    assert verdict(calm) == ("warn", f"field(s) unknown to the installed PEFT {INSTALLED}, all at default values: "
                                     f"zz_a, zz_b (written by PEFT 9.0, PEFT {INSTALLED} drops them with a warning: "
                                     "harmless here, but PEFT before about 0.14 raises TypeError on them)")
    assert calm.fix == "delete these fields from adapter_config.json for older PEFT versions, or upgrade peft"
    assert calm.details == {"unknown_fields": {"zz_b": None, "zz_a": False}, "peft_version_written": "9.0",
                            "peft_version_installed": INSTALLED}
    anon = static.check_config_valid(cfg_ctx({**CONFIG, "zz": None}))
    assert anon.message.endswith(f"default values: zz (PEFT {INSTALLED} drops them with a warning: harmless here, "
                                 "but PEFT before about 0.14 raises TypeError on them)")
    loud = static.check_config_valid(cfg_ctx({**CONFIG, "zz": 1}))
    assert loud.fix == "install the PEFT version that wrote this adapter"
    assert "values: zz (PEFT" in loud.message


def test_target_regex_matching_none_of_the_adapters_modules(tmp_path):
    ctx = good(tmp_path, {**CONFIG, "target_modules": r".*\.k_proj"})
    got = static.check_config_valid(ctx)
    assert verdict(got) == ("fail", r"adapter_config.json: target_modules regex '.*\\.k_proj' matches none of the 2 "
                                    f"module(s) the adapter holds LoRA weights for (e.g. {Q}): PEFT would create no "
                                    "LoRA layer and load none of the adapter's tensors")
    assert got.fix == ("set target_modules to a regex that matches each trained module's full name (PEFT uses "
                       r"re.fullmatch, e.g. .*\.(q_proj|v_proj)) or to the list of their names, as get_peft_model "
                       "was given at training time")
    assert got.details == {"fields": ["target_modules"]}


def test_target_regex_missing_some_modules(tmp_path):
    ctx = good(tmp_path, {**CONFIG, "target_modules": r".*\.v_proj"})
    got = static.check_config_valid(ctx)
    assert verdict(got) == ("fail", r"adapter_config.json: target_modules regex '.*\\.v_proj' misses 1 of the 2 "
                                    f"module(s) the adapter holds LoRA weights for (e.g. {Q}): PEFT would drop their "
                                    "tensors and load the adapter only in part")


def test_unmatched_targets_uses_fullmatch_as_peft_does(tmp_path):
    ctx = good(tmp_path)
    message, _fix = static._unmatched_targets(ctx, {**CONFIG, "target_modules": "q_proj|v_proj"})
    assert message.startswith("adapter_config.json: target_modules regex 'q_proj|v_proj' matches none of the 2 ")
    message, _fix = static._unmatched_targets(ctx, {**CONFIG, "target_modules": "model"})  # re.match would take all
    assert "matches none of the 2" in message
    message, _fix = static._unmatched_targets(ctx, {**CONFIG, "target_modules": "model.*q_proj"})
    assert " misses 1 of the 2 module(s) the adapter holds LoRA weights for (e.g. model.layers.0.self_attn.v_proj)" \
        in message


def test_unmatched_targets_only_for_a_plain_regex_over_plain_keys(tmp_path):
    ctx = good(tmp_path)
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": r".*\.(q|v)_proj"}) is None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": "k_proj"}) is not None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": ["k_proj"]}) is None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": "all-linear"}) is None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": "k", "target_parameters": ["w"]}) is None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": "(", }) is None
    assert static._unmatched_targets(ctx, {**CONFIG, "target_modules": "(([a-z0-9_.]|[a-z0-9_.])+)+#"}) is None
    assert static._unmatched_targets(CheckContext(), {**CONFIG, "target_modules": "k"}) is None
    assert static._unmatched_targets(cfg_ctx(CONFIG), {**CONFIG, "target_modules": "k"}) is None
    # doubled prefixes and adapter names are key-grammar's: their modules are not judged here
    odd = make(tmp_path / "odd", {f"{P}{P}{Q}.lora_A.weight": torch.ones(2, 4),
                                  f"{P}{V}.lora_A.default.weight": torch.ones(2, 4)})
    assert static._unmatched_targets(odd, {**CONFIG, "target_modules": "k"}) is None
    # the example regex names at most five leaves, sorted
    many = make(tmp_path / "many", {k: v for i in range(7) for k, v in lora(f"m.p{i}").items()})
    message, fix = static._unmatched_targets(many, {**CONFIG, "target_modules": "zz"})
    assert r"e.g. .*\.(p0|p1|p2|p3|p4))" in fix
    assert "none of the 7 module(s)" in message and "(e.g. m.p0)" in message
    # a module at the top level (no dot in its name) is its own leaf
    top = make(tmp_path / "top", {**lora("lm_head"), **lora(Q)})
    message, fix = static._unmatched_targets(top, {**CONFIG, "target_modules": "zz"})
    assert r"e.g. .*\.(lm_head|q_proj))" in fix and "(e.g. lm_head)" in message


# -- weights-readable ------------------------------------------------------------------------------


def test_weights_readable_only_model_weights(tmp_path):
    root = write(tmp_path / "a", None, CONFIG)
    for i in range(4):
        save_file({"w": torch.ones(1)}, str(root / f"model-0000{i}-of-00004.safetensors"))
    got = static.check_weights_readable(ctx_of(root))
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(4)]
    assert verdict(got) == ("fail", f"no adapter_model.safetensors or adapter_model.bin; found {', '.join(names[:3])} "
                                    "(+1 more) (model weights, see full-checkpoint)")
    assert got.fix == "pass the directory written by peft_model.save_pretrained()"
    assert got.details == {"found": names}


def test_weights_readable_no_weights_at_all(tmp_path):
    ctx = make(tmp_path)
    got = static.check_weights_readable(ctx)
    assert verdict(got) == ("fail", f"no weights file in {ctx.adapter.root}: expected adapter_model.safetensors (or "
                                    "adapter_model.bin)")
    assert got.fix == "copy the adapter weights next to adapter_config.json, or re-save with save_pretrained"
    assert got.details == {}


def test_weights_readable_broken_files(tmp_path):
    root = write(tmp_path / "a", {**lora(Q)}, bin_tensors=None)
    (root / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    ctx = ctx_of(root)
    got = static.check_weights_readable(ctx)
    error = ctx.adapter.adapter_files[0].error
    assert error and verdict(got) == ("fail", f"adapter_model.safetensors: {error}")
    assert got.fix == ("re-save the adapter with save_pretrained(safe_serialization=True), or re-download it "
                       "completely")
    assert got.details == {"errors": {"adapter_model.safetensors": error}}
    (root / "adapter_model.bin").write_bytes(b"not a pickle")
    ctx = ctx_of(root)
    got = static.check_weights_readable(ctx)
    assert got.message == f"adapter_model.safetensors: {error} (and 1 more file)"
    assert set(got.details["errors"]) == {"adapter_model.safetensors", "adapter_model.bin"}


def test_weights_readable_unsafe_pickle_points_there(tmp_path):
    from fixtures.hostile import SystemCall

    root = write(tmp_path / "a", None)
    torch.save({"x": SystemCall("true")}, root / "adapter_model.bin")
    got = static.check_weights_readable(ctx_of(root))
    assert got.status == "fail" and got.message.startswith("adapter_model.bin: ")
    assert got.fix == "see unsafe-pickle"


def test_weights_readable_empty_file(tmp_path):
    got = static.check_weights_readable(make(tmp_path, {}))
    assert verdict(got) == ("fail", "adapter_model.safetensors holds no tensors")
    assert got.fix == "the save wrote nothing: check that the model had LoRA layers and re-save with save_pretrained"


def test_weights_readable_one_file(tmp_path):
    ctx = make(tmp_path, lora(Q))
    size = ctx.adapter.adapter_files[0].size
    got = static.check_weights_readable(ctx)
    assert verdict(got) == ("pass", f"adapter_model.safetensors: 2 tensors, {size} bytes, header sane")
    assert got.details == {"adapter_model.safetensors": {"tensors": 2, "bytes": size}}


def test_weights_readable_two_formats(tmp_path):
    tensors = lora(Q)
    said = []
    ctx = make(tmp_path, tensors, bin_tensors=tensors)
    ctx.progress = said.append
    files = {wf.name: wf for wf in ctx.adapter.adapter_files}
    details = {n: {"tensors": 2, "bytes": wf.size} for n, wf in files.items()}
    got = static.check_weights_readable(ctx)
    assert verdict(got) == ("pass", "adapter_model.safetensors and adapter_model.bin are identical (2 tensors)")
    assert got.details == details
    assert said == ["comparing adapter_model.bin with adapter_model.safetensors"]
    changed = {**tensors, f"{P}{Q}.lora_B.weight": torch.zeros(3, 2)}
    ctx = make(tmp_path / "b", tensors, bin_tensors=changed)
    got = static.check_weights_readable(ctx)
    assert verdict(got) == ("fail", "adapter_model.bin and adapter_model.safetensors differ: 1 tensor(s) differ, e.g. "
                                    f"{P}{Q}.lora_B.weight")
    assert got.fix == "delete the stale file (PEFT loads adapter_model.safetensors when both exist) and keep one"
    assert got.details["differences"] == [f"1 tensor(s) differ, e.g. {P}{Q}.lora_B.weight"]
    assert set(got.details) == {"differences", "adapter_model.safetensors", "adapter_model.bin"}
    only_bin = {**tensors, "extra": torch.ones(1)}
    got = static.check_weights_readable(make(tmp_path / "c", tensors, bin_tensors=only_bin))
    assert got.message.endswith("differ: 1 key(s) only in adapter_model.bin, e.g. extra")


# -- unsafe-pickle ---------------------------------------------------------------------------------


def test_unsafe_pickle_without_bin_skips(tmp_path):
    assert verdict(static.check_unsafe_pickle(make(tmp_path, lora(Q)))) == ("skip", "no .bin file (safetensors only)")


def test_unsafe_pickle_safe_bin_passes(tmp_path):
    got = static.check_unsafe_pickle(make(tmp_path, lora(Q), bin_tensors=lora(Q)))
    assert verdict(got) == ("pass", "adapter_model.bin: only torch tensor-rebuild globals, loaded with weights_only=True")


def _bin(name: str, unsafe):
    return SimpleNamespace(name=name, format="bin", unsafe_globals=unsafe, error="E " + name)


def test_unsafe_pickle_names_what_it_would_call():
    files = [_bin("a.bin", ["os.system", "builtins.eval", "x.y", "z.w"]), _bin("b.bin", ["q.r"])]
    got = static.check_unsafe_pickle(CheckContext(adapter=SimpleNamespace(weight_files=files)))
    assert verdict(got) == ("fail", "a.bin is a pickle that would call os.system, builtins.eval, x.y (+1 more); refused "
                                    "and not executed")
    assert got.details == {"file": "a.bin", "unsafe_globals": ["os.system", "builtins.eval", "x.y", "z.w"]}
    few = static.check_unsafe_pickle(CheckContext(adapter=SimpleNamespace(weight_files=[_bin("c.bin", ["a.b"])])))
    assert few.message == "c.bin is a pickle that would call a.b; refused and not executed"


def test_unsafe_pickle_uninspectable_skips_and_safe_ones_are_all_named():
    files = [_bin("a.bin", []), _bin("b.bin", None), _bin("c.bin", None),
             SimpleNamespace(name="s", format="safetensors", unsafe_globals=["x"])]
    got = static.check_unsafe_pickle(CheckContext(adapter=SimpleNamespace(weight_files=files)))
    assert verdict(got) == ("skip", "b.bin could not be inspected: E b.bin (see weights-readable)")
    both = static.check_unsafe_pickle(CheckContext(adapter=SimpleNamespace(weight_files=files[:1] + [_bin("d.bin", [])])))
    assert verdict(both) == ("pass", "a.bin, d.bin: only torch tensor-rebuild globals, loaded with weights_only=True")


def test_unsafe_pickle_real_file(tmp_path):
    from fixtures.hostile import SystemCall

    root = write(tmp_path / "a", lora(Q))
    torch.save({"x": SystemCall("true")}, root / "adapter_model.bin")
    got = static.check_unsafe_pickle(ctx_of(root))
    assert got.status == "fail" and got.message.startswith("adapter_model.bin is a pickle that would call ")
    assert "system" in got.message and got.details["file"] == "adapter_model.bin"


# -- shared: data availability, full checkpoints -------------------------------------------------------


def test_data_unavailable_reasons(tmp_path):
    assert static._data_unavailable(CheckContext()) == "no adapter given"
    assert static._data_unavailable(make(tmp_path / "n")) == "no readable weights file (see weights-readable)"
    assert static._data_unavailable(good(tmp_path / "g")) is None
    assert static._data_unavailable(make(tmp_path / "f", {f"{P}{Q}.base_layer.weight": torch.ones(1)})) == \
        "not an adapter (see full-checkpoint)"
    foreign = write(tmp_path / "m", None)
    save_file(lora(Q), str(foreign / "model.safetensors"))
    assert static._data_unavailable(ctx_of(foreign)) == "not an adapter (see full-checkpoint)"


@pytest.mark.parametrize("check", [static.check_empty_tensors, static.check_shapes, static.check_finite,
                                   static.check_noop])
def test_data_checks_skip_without_adapter_data(check, tmp_path):
    assert verdict(check(make(tmp_path / "n"))) == ("skip", "no readable weights file (see weights-readable)")
    full = make(tmp_path / "f", {"model.embed.weight": torch.ones(2)})
    assert verdict(check(full)) == ("skip", "not an adapter (see full-checkpoint)")


def test_full_checkpoint_of_a_model_directory(tmp_path):
    root = write(tmp_path / "a", None, None, model_config={"model_type": "llama"})
    for name in ("model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                 "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"):
        save_file({"model.embed.weight": torch.ones(2)}, str(root / name))
    got = static.check_full_checkpoint(ctx_of(root))
    assert verdict(got) == ("fail", "a full model directory (config.json + model-00001-of-00004.safetensors, "
                                    "model-00002-of-00004.safetensors, model-00003-of-00004.safetensors) with no "
                                    "adapter_config.json: a merged or base model, not an adapter")


def test_full_checkpoint_model_weights_without_config_json_are_judged_by_keys(tmp_path):
    root = write(tmp_path / "a", None, None)
    save_file(lora(Q), str(root / "model.safetensors"))
    got = static.check_full_checkpoint(ctx_of(root))
    assert verdict(got) == ("fail", "only model weight files (model.safetensors), no adapter_model.safetensors/.bin")
    with_config = write(tmp_path / "b", None, CONFIG, model_config={"x": 1})
    save_file(lora(Q), str(with_config / "model.safetensors"))
    assert static.check_full_checkpoint(ctx_of(with_config)).message.startswith("only model weight files")


def test_full_checkpoint_base_weights(tmp_path):
    tensors = {**lora(Q), f"{P}{Q}.base_layer.weight": torch.ones(3, 4)}
    got = static.check_full_checkpoint(make(tmp_path, tensors))
    assert verdict(got) == ("fail", f"1 of 3 keys are base weights (e.g. {P}{Q}.base_layer.weight): a full PeftModel "
                                    "state_dict(), not the adapter save_pretrained writes")


def test_full_checkpoint_no_lora_tensor(tmp_path):
    got = static.check_full_checkpoint(make(tmp_path, {"model.a.weight": torch.ones(2), "model.b.weight": torch.ones(2)}))
    assert verdict(got) == ("fail", "none of the 2 keys is a LoRA tensor (e.g. model.a.weight): a full or merged model "
                                    "state dict, not an adapter")
    plora = make(tmp_path / "p", {f"{P}model.layers.0.attention.wqkv.Plora_A.weight": torch.ones(2)})
    assert static.check_full_checkpoint(plora).message.startswith("none of the 1 keys is a LoRA tensor")


def test_full_checkpoint_mostly_other_tensors(tmp_path):
    tensors = {**lora(Q), "model.a.weight": torch.ones(2), "model.b.weight": torch.ones(2),
               f"{P}model.layers.0.attention.wqkv.Plora_A.weight": torch.ones(2)}
    got = static.check_full_checkpoint(make(tmp_path, tensors))
    assert verdict(got) == ("fail", f"3 of 5 keys are not LoRA tensors (e.g. {P}model.layers.0.attention.wqkv.Plora_A"
                                    ".weight): a model state dict with LoRA tensors inside, not an adapter")
    even = {**lora(Q), "model.a.weight": torch.ones(2), "model.b.weight": torch.ones(2)}
    got = static.check_full_checkpoint(make(tmp_path / "e", even))
    assert verdict(got) == ("pass", "an adapter: 2 LoRA tensors")


def test_full_checkpoint_skips_and_passes(tmp_path):
    assert verdict(static.check_full_checkpoint(make(tmp_path / "n"))) == \
        ("skip", "no readable weights file (see weights-readable)")
    assert verdict(static.check_full_checkpoint(good(tmp_path))) == ("pass", "an adapter: 4 LoRA tensors")
    assert verdict(static.check_full_checkpoint(make(tmp_path / "z", {}))) == ("pass", "an adapter: 0 LoRA tensors")


def test_full_checkpoint_reason_is_computed_once(tmp_path):
    ctx = good(tmp_path)
    assert static.full_checkpoint_reason(ctx) is None
    assert "static.full_checkpoint" in ctx.cache and "static.keys" in ctx.cache
    ctx.cache["static.full_checkpoint"] = "memo"
    assert static.full_checkpoint_reason(ctx) == "memo"
    ctx.cache["static.keys"] = "keys memo"
    assert static.analyse_keys(ctx) == "keys memo"
    ctx.cache["static.scan"] = "scan memo"
    assert static.tensor_scan(ctx) == "scan memo"


def test_shared_work_is_named_in_the_time_section(tmp_path):
    from harness import worklog

    log = worklog.WorkLog()
    with worklog.recording(log):
        ctx = good(tmp_path)
        static.check_full_checkpoint(ctx)
        static.check_finite(ctx)
        static.check_noop(ctx)
    assert {w.key: w.name for w in log.entries()} == {
        "static.full_checkpoint": "telling an adapter from a full checkpoint",
        "static.keys": "classifying the adapter's keys",
        "static.scan": "scanning the adapter's tensors (finite, zero, empty)"}


def test_analyse_keys_reads_the_config(tmp_path):
    ctx = make(tmp_path, {**lora(Q), f"{P}output.weight": torch.ones(2)},
               {**CONFIG, "modules_to_save": ["output"]})
    assert [i.kind for i in static.analyse_keys(ctx).infos if i.key.endswith("output.weight")] == ["modules_to_save"]


# -- empty-tensors ---------------------------------------------------------------------------------


def test_empty_tensors(tmp_path):
    tensors = {**lora(Q), **{f"{P}m{i}.lora_A.weight": torch.ones(0, 4 + i) for i in range(12)}}
    got = static.check_empty_tensors(make(tmp_path, tensors))
    first = f"{P}m0.lora_A.weight"
    assert verdict(got) == ("fail", f"12 of 14 tensors are empty (e.g. {first} shape (0, 4)): saved under ZeRO-3 "
                                    "without gathering the partitioned parameters")
    assert got.details["empty"] == 12
    assert got.details["examples"] == {f"{P}m{i}.lora_A.weight": [0, 4 + i] for i in sorted(range(12), key=str)[:10]}
    assert len(got.details["examples"]) == 10
    assert verdict(static.check_empty_tensors(good(tmp_path / "g"))) == ("pass", "all 4 tensors have elements")


# -- key-grammar -----------------------------------------------------------------------------------


def grammar(tmp_path: Path, tensors: dict, config: dict = CONFIG):
    return static.check_key_grammar(make(tmp_path, tensors, config))


def test_key_grammar_skips(tmp_path):
    assert verdict(static.check_key_grammar(make(tmp_path / "n"))) == \
        ("skip", "no readable weights file (see weights-readable)")
    assert verdict(grammar(tmp_path / "e", {})) == ("skip", "no tensors")
    root = write(tmp_path / "f", None, None)
    save_file(lora(Q), str(root / "model.safetensors"))
    assert verdict(static.check_key_grammar(ctx_of(root))) == ("skip", "not an adapter (see full-checkpoint)")


def test_key_grammar_passes_with_the_kinds_counted(tmp_path):
    got = grammar(tmp_path, {**lora(Q), **lora(V), f"{P}output.weight": torch.ones(2)},
                  {**CONFIG, "modules_to_save": ["output"]})
    assert verdict(got) == ("pass", "5 keys follow PEFT's adapter format")
    assert got.details == {"kinds": {"lora": 4, "modules_to_save": 1}}


def test_key_grammar_doubled_prefix(tmp_path):
    keys = [f"{P}{P}{P}{Q}.lora_A.weight", f"{P}{P}{V}.lora_A.weight"]
    got = grammar(tmp_path, {k: torch.ones(2, 4) for k in keys})
    assert verdict(got) == ("fail", f"2 key(s) carry the base_model.model. prefix 3 times (e.g. {keys[0]})")
    assert got.fix == ("the adapter was saved from a PeftModel wrapped twice (get_peft_model on a PeftModel); strip one "
                       "'base_model.model.' or re-save from a singly wrapped model")
    assert got.details == {"problems": [got.message], "examples": keys}


def test_key_grammar_missing_prefix(tmp_path):
    keys = [f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"]
    got = grammar(tmp_path, {keys[0]: torch.ones(2, 4), keys[1]: torch.ones(3, 2)})
    assert verdict(got) == ("fail", f"2 key(s) lack the base_model.model. prefix (e.g. {keys[0]})")
    assert got.fix == ("save with peft_model.save_pretrained(); PEFT expects keys like "
                       "base_model.model.<module>.lora_A.weight")
    assert got.details == {"problems": [got.message], "examples": keys}


def test_key_grammar_adapter_name(tmp_path):
    keys = [f"{P}{Q}.lora_A.zed.weight", f"{P}{V}.lora_A.alpha.weight"]
    got = grammar(tmp_path, {k: torch.ones(2, 4) for k in keys})
    assert verdict(got) == ("fail", f"2 key(s) still contain the adapter name 'alpha' (e.g. {keys[0]})")
    assert got.fix == ("save with peft_model.save_pretrained(), which strips the adapter name; or remove '.alpha' from "
                       "the keys")
    assert got.details == {"problems": [got.message], "examples": keys}


def test_key_grammar_branch_weights(tmp_path):
    key = f"{P}model.layers.0.attention.wqkv.Plora_A.weight"
    got = grammar(tmp_path, {**lora(Q), key: torch.ones(2)})
    assert verdict(got) == ("fail", f"1 key(s) are the base model's PLoRA weights, not LoRA tensors (e.g. {key}): a "
                                    "name filter on 'lora_' also matches Plora_A/Plora_B/plora_*_GN")
    assert got.fix == ("save with peft_model.save_pretrained() (PEFT >= 0.21 selects adapter weights structurally), or "
                       "select keys with '.lora_A.'/'.lora_B.' rather than 'lora_'")
    assert got.details == {"problems": [got.message], "examples": [key]}


def test_key_grammar_base_and_unknown_keys_and_the_count_of_problems(tmp_path):
    base, odd = f"{P}{Q}.base_layer.weight", f"{P}{Q}.weird"
    got = grammar(tmp_path, {**lora(Q), **lora(V), base: torch.ones(2), odd: torch.ones(2)})
    first = f"1 key(s) are base weights (base_layer/original_module, e.g. {base})"
    second = f"1 key(s) are not LoRA tensors PEFT knows (e.g. {odd})"
    assert verdict(got) == ("fail", first + "; and 1 more problem(s)")
    assert got.fix == "save with peft_model.save_pretrained(), not model.state_dict()"
    assert got.details == {"problems": [first, second], "examples": [base]}
    alone = grammar(tmp_path / "u", {**lora(Q), **lora(V), odd: torch.ones(2)})
    assert verdict(alone) == ("fail", second)
    assert alone.fix == "remove them, or list the fully trained modules in modules_to_save so PEFT restores them"


@CURRENT_STACK_ONLY
def test_key_grammar_dora_without_magnitudes(tmp_path):
    got = grammar(tmp_path, lora(Q), {**CONFIG, "use_dora": True})
    assert verdict(got) == ("fail", "use_dora is true but there is no lora_magnitude_vector: PEFT would re-initialise "
                                    "the DoRA magnitudes")
    assert got.fix == "re-save with save_pretrained from the trained DoRA model"
    assert got.details == {"problems": [got.message], "examples": []}
    fine = grammar(tmp_path / "m", {**lora(Q), f"{P}{Q}.lora_magnitude_vector": torch.ones(3)}, {**CONFIG, "use_dora": True})
    assert fine.status == "pass"


def test_key_grammar_examples_are_capped_at_five(tmp_path):
    keys = [f"model.m{i}.lora_A.weight" for i in range(7)]
    got = grammar(tmp_path, {k: torch.ones(2, 4) for k in keys})
    assert got.details["examples"] == keys[:5]
    assert got.message == f"7 key(s) lack the base_model.model. prefix (e.g. {keys[0]})"


# -- shapes ----------------------------------------------------------------------------------------


def test_shapes_pass_with_ranks_counted(tmp_path):
    tensors = {**lora(Q, r=2), **lora(V, r=4), **lora("model.layers.1.self_attn.q_proj", r=2)}
    got = static.check_shapes(make(tmp_path, tensors, {**CONFIG, "r": 2, "rank_pattern": {"v_proj": 4}}))
    assert verdict(got) == ("pass", "3 LoRA modules, shapes consistent with the config (r=2 x2, r=4 x1)")
    assert got.details == {"ranks": {"2": 2, "4": 1}, "trainable_tokens": 0}


def test_shapes_fail_names_the_module_and_counts(tmp_path):
    tensors = {**lora(Q, r=4), **lora(V, r=2)}
    tensors[f"{P}{V}.lora_B.weight"] = torch.ones(3, 3)
    got = static.check_shapes(make(tmp_path, tensors))
    first = f"{Q}: rank 4 [4, 4]/[3, 4] but the config's r gives 2"
    assert verdict(got) == ("fail", f"2 LoRA module(s) with inconsistent shapes: {first}")
    assert got.details == {"problems": [first, f"{V}: lora_A rank 2 ([2, 4]) != lora_B rank 3 ([3, 3])"], "count": 2}


def test_shapes_problems_are_capped_at_ten(tmp_path):
    tensors = {f"{P}m{i}.lora_A.weight": torch.ones(2, 4) for i in range(12)}
    got = static.check_shapes(make(tmp_path, tensors))
    assert got.details["count"] == 12 and len(got.details["problems"]) == 10
    assert got.message.startswith("12 LoRA module(s) with inconsistent shapes: m0: lora_A without lora_B")


@CURRENT_STACK_ONLY
def test_shapes_skip_when_only_empty_tensors(tmp_path):
    got = static.check_shapes(make(tmp_path, {f"{P}{Q}.lora_A.weight": torch.ones(0, 4),
                                              f"{P}{Q}.lora_B.weight": torch.ones(3, 2)}))
    assert got.status == "fail" and "lora_B without lora_A" in got.message  # the empty part is left out
    empty = static.check_shapes(make(tmp_path / "e", {f"{P}{Q}.lora_A.weight": torch.ones(0, 4)}))
    assert verdict(empty) == ("skip", "no non-empty LoRA tensors (see empty-tensors)")
    none = static.check_shapes(make(tmp_path / "n", {f"{P}{Q}.lora_magnitude_vector": torch.ones(3)}))
    assert verdict(none) == ("pass", "0 LoRA modules, shapes consistent with the config ()")


def test_shapes_lora_bias_part(tmp_path):
    tensors = {**lora(Q), f"{P}{Q}.lora_B.bias": torch.ones(5)}
    got = static.check_shapes(make(tmp_path, tensors))
    assert got.status == "fail" and got.message.endswith(f"{Q}: lora_B.bias [5] does not match lora_B out 3")
    fine = static.check_shapes(make(tmp_path / "f", {**lora(Q), f"{P}{Q}.lora_B.bias": torch.ones(3)}))
    assert fine.status == "pass"


def test_shapes_trainable_tokens(tmp_path):
    module = "model.embed_tokens"
    key = f"{P}{module}.token_adapter.trainable_tokens_delta"
    config = {**CONFIG, "trainable_token_indices": {"embed_tokens": [1, 2]}}
    got = static.check_shapes(make(tmp_path, {**lora(Q), key: torch.ones(2, 8)}, config))
    assert verdict(got) == ("pass", "1 LoRA modules, shapes consistent with the config (r=2 x1); trainable tokens on "
                                    "1 module(s)")
    assert got.details == {"ranks": {"2": 1}, "trainable_tokens": 1}
    only = static.check_shapes(make(tmp_path / "o", {key: torch.ones(2, 8)}, config))
    assert verdict(only) == ("pass", "0 LoRA modules, shapes consistent with the config (); trainable tokens on 1 "
                                     "module(s)")
    two = {**CONFIG, "trainable_token_indices": {"embed_tokens": [1, 2], "lm_head": [3]}}
    got = static.check_shapes(make(tmp_path / "t", {key: torch.ones(2, 8), f"{P}lm_head.token_adapter."
                                                    "trainable_tokens_delta": torch.ones(1, 8)}, two))
    assert got.message.endswith("; trainable tokens on 2 module(s)") and got.details["trainable_tokens"] == 2
    bad = static.check_shapes(make(tmp_path / "b", {**lora(Q), key: torch.ones(3, 8)}, config))
    assert bad.status == "fail" and bad.message.startswith(f"1 LoRA module(s) with inconsistent shapes: {module}: ")
    empty = static.check_shapes(make(tmp_path / "e", {key: torch.ones(0, 8)}, config))
    assert verdict(empty) == ("skip", "no non-empty LoRA tensors")
    named = f"{P}{module}.token_adapter.trainable_tokens_delta.other"  # key-grammar's: an adapter name left in
    got = static.check_shapes(make(tmp_path / "n", {**lora(Q), named: torch.ones(3, 8)}, config))
    assert verdict(got) == ("pass", "1 LoRA modules, shapes consistent with the config (r=2 x1)")
    assert got.details == {"ranks": {"2": 1}, "trainable_tokens": 0}


def test_tokens_shape_problem_without_a_base():
    config = {**CONFIG, "trainable_token_indices": {"embed_tokens": [1, 2]}}
    assert static.tokens_shape_problem(None, config, "model.embed_tokens", (2, 8)) is None
    problem = static.tokens_shape_problem(None, config, "model.embed_tokens", (3, 8))
    assert problem.startswith("model.embed_tokens: ")
    assert static.tokens_shape_problem(None, CONFIG, "model.embed_tokens", (3, 8)) is None


def test_tokens_shape_problem_with_a_base():
    held = {"ckpt.embed_tokens.weight": ((10, 8), "float32")}
    base = SimpleNamespace(input_embedding="model.embed_tokens", weights=held,
                           checkpoint_key=lambda k: k.replace("model.", "ckpt.", 1))
    config = {**CONFIG, "trainable_token_indices": [1, 12]}
    assert static.tokens_shape_problem(base, config, "model.embed_tokens", (2, 8)) == (
        "model.embed_tokens: token indices [12] are not rows of the weight (must be [0, 10))")
    fine = {**CONFIG, "trainable_token_indices": [1, 2]}
    assert static.tokens_shape_problem(base, fine, "model.embed_tokens", (2, 8)) is None
    assert static.tokens_shape_problem(base, fine, "model.embed_tokens", (2, 9)) == (
        "model.embed_tokens: trainable_tokens_delta [2, 9], expected [2, 8] (one row as wide as the weight [10, 8] per "
        "token index in trainable_token_indices, 2 of them)")
    assert static.tokens_shape_problem(None, fine, "model.embed_tokens", (2, 9)) is None
    # a list of token indices trains the base's input embedding only: another module's delta is not judged here
    held["ckpt.lm_head.weight"] = ((10, 8), "float32")
    assert static.tokens_shape_problem(base, fine, "model.lm_head", (3, 8)) is None
    assert static.tokens_shape_problem(None, fine, "model.lm_head", (3, 8)) is not None


# -- finite ----------------------------------------------------------------------------------------


def test_finite_counts_nan_and_inf(tmp_path):
    tensors = {**lora(Q), **lora(V)}
    tensors[f"{P}{Q}.lora_A.weight"] = torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.0]] * 2)
    tensors[f"{P}{V}.lora_B.weight"] = torch.tensor([[float("nan")] * 2] * 3)
    said = []
    ctx = make(tmp_path, tensors)
    ctx.progress = said.append
    got = static.check_finite(ctx)
    assert said == ["scanning tensor data"]
    assert verdict(got) == ("fail", f"2 tensor(s) contain NaN/Inf (e.g. {P}{Q}.lora_A.weight: 2 NaN, 4 Inf)")
    assert got.details == {"tensors": {f"{P}{Q}.lora_A.weight": {"nan": 2, "inf": 4, "numel": 8},
                                       f"{P}{V}.lora_B.weight": {"nan": 6, "inf": 0, "numel": 6}}, "count": 2}
    assert verdict(static.check_finite(good(tmp_path / "g"))) == ("pass", "all 4 tensors finite")


def test_finite_caps_examples_at_ten(tmp_path):
    tensors = {f"{P}m{i:02}.lora_A.weight": torch.full((1, 2), float("nan")) for i in range(12)}
    got = static.check_finite(make(tmp_path, tensors))
    assert got.details["count"] == 12 and len(got.details["tensors"]) == 10


def _stats(**per_key):
    from harness.inputs.scan import TensorStats

    return {k: TensorStats(numel=4, dtype="float32", **v) for k, v in per_key.items()}


def test_finite_read_errors(tmp_path):
    ctx = good(tmp_path)
    stats = _stats(a={"nonzero": True}, b={"error": "boom"}, c={"error": "bang"})
    ctx.cache["static.scan"] = stats
    got = static.check_finite(ctx)
    assert verdict(got) == ("fail", "could not read tensor b: boom")
    assert got.fix == "re-save or re-download the adapter"
    assert got.details == {"errors": {"b": "boom", "c": "bang"}}
    many = _stats(**{f"k{i:02}": {"error": "e"} for i in range(12)})
    ctx.cache["static.scan"] = many
    assert len(static.check_finite(ctx).details["errors"]) == 10
    ctx.cache["static.scan"] = _stats(a={"finite": False, "nan": 1}, b={"error": "boom"})
    assert static.check_finite(ctx).message.startswith("1 tensor(s) contain NaN/Inf (e.g. a: 1 NaN, 0 Inf)")


# -- noop ------------------------------------------------------------------------------------------


def test_noop_all_zero(tmp_path):
    got = static.check_noop(make(tmp_path, {**lora(Q, b_value=0.0), **lora(V, b_value=0.0)}))
    keys = [f"{P}{Q}.lora_B.weight", f"{P}{V}.lora_B.weight"]
    assert verdict(got) == ("fail", "all 2 lora_B tensors are exactly zero: an untrained adapter, it changes nothing")
    assert got.details == {"zero": 2, "examples": keys}


@CURRENT_STACK_ONLY
def test_noop_zero_but_other_tensors_change_the_model(tmp_path):
    tensors = {**lora(Q, b_value=0.0), f"{P}{Q}.lora_magnitude_vector": torch.ones(3), f"{P}{Q}.lora_B.bias": torch.ones(3)}
    got = static.check_noop(make(tmp_path, tensors))
    assert verdict(got) == ("warn", "all 1 lora_B tensors are zero; only 1 other tensor(s) (modules_to_save / trainable "
                                    "tokens / DoRA magnitudes / biases) can change the model")
    assert got.details == {"zero": 1}
    saved = {**lora(Q, b_value=0.0), f"{P}output.weight": torch.ones(2)}
    got = static.check_noop(make(tmp_path / "s", saved, {**CONFIG, "modules_to_save": ["output"]}))
    assert got.status == "warn" and "only 1 other tensor(s)" in got.message
    tokens = {**lora(Q, b_value=0.0), f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta": torch.ones(2, 8)}
    got = static.check_noop(make(tmp_path / "t", tokens, {**CONFIG, "trainable_token_indices": {"embed_tokens": [1, 2]}}))
    assert got.status == "warn"


def test_noop_some_zero(tmp_path):
    tensors = {**lora(Q, b_value=0.0), **lora(V)}
    got = static.check_noop(make(tmp_path, tensors))
    assert verdict(got) == ("warn", f"1 of 2 lora_B tensors are exactly zero (e.g. {P}{Q}.lora_B.weight): those modules "
                                    "were never updated")
    assert got.fix == ("check that those modules received gradients (frozen layers, layers_to_transform, unused "
                       "branches)")
    assert got.details == {"zero": 1, "examples": [f"{P}{Q}.lora_B.weight"]}


def test_noop_examples_capped_and_bias_ignored(tmp_path):
    tensors = {k: v for i in range(7) for k, v in lora(f"m.p{i}", b_value=0.0).items()}
    tensors[f"{P}m.p0.lora_B.bias"] = torch.zeros(3)
    got = static.check_noop(make(tmp_path, tensors))
    assert got.status == "fail" and len(got.details["examples"]) == 5 and got.details["zero"] == 7


def test_noop_some_zero_examples_capped_at_five(tmp_path):
    tensors = {k: v for i in range(7) for k, v in lora(f"m.p{i}", b_value=0.0).items()}
    got = static.check_noop(make(tmp_path, {**tensors, **lora(Q)}))
    assert got.status == "warn" and got.message.startswith("7 of 8 lora_B tensors are exactly zero (e.g. ")
    assert got.details == {"zero": 7, "examples": [f"{P}m.p{i}.lora_B.weight" for i in range(5)]}


def test_noop_a_one_element_lora_b_is_not_empty(tmp_path):
    got = static.check_noop(make(tmp_path, lora(Q, r=1, out=1)))
    assert verdict(got) == ("pass", "all 1 lora_B tensors are non-zero")


def test_noop_zero_lora_b_with_trained_biases_warns(tmp_path):
    tensors = {**lora(Q, b_value=0.0), f"{P}{Q}.base_layer.bias": torch.ones(3)}
    got = static.check_noop(make(tmp_path, tensors, {**CONFIG, "bias": "all"}))
    assert got.status == "warn" and "only 1 other tensor(s)" in got.message


def test_noop_passes_and_skips(tmp_path):
    assert verdict(static.check_noop(good(tmp_path))) == ("pass", "all 2 lora_B tensors are non-zero")
    only_a = make(tmp_path / "a", {f"{P}{Q}.lora_A.weight": torch.ones(2, 4), f"{P}{Q}.lora_B.bias": torch.ones(3)})
    assert verdict(static.check_noop(only_a)) == ("skip", "no lora_B tensors")
    empty = make(tmp_path / "e", {f"{P}{Q}.lora_A.weight": torch.ones(2, 4), f"{P}{Q}.lora_B.weight": torch.ones(3, 0)})
    assert verdict(static.check_noop(empty)) == ("skip", "every lora_B is empty (see empty-tensors)")
    embed = make(tmp_path / "m", {f"{P}m.embed_tokens.lora_embedding_A": torch.ones(2, 5),
                                  f"{P}m.embed_tokens.lora_embedding_B": torch.zeros(3, 2)})
    assert static.check_noop(embed).message.startswith("all 1 lora_B tensors are exactly zero")


def test_noop_read_errors_are_not_zero(tmp_path):
    ctx = make(tmp_path, {**lora(Q, b_value=0.0), **lora(V, b_value=0.0)})
    from harness.inputs.scan import TensorStats

    ctx.cache["static.scan"] = {f"{P}{Q}.lora_B.weight": TensorStats(numel=6, dtype="f", error="boom"),
                                f"{P}{V}.lora_B.weight": TensorStats(numel=6, dtype="f")}
    got = static.check_noop(ctx)
    assert verdict(got) == ("warn", f"1 of 2 lora_B tensors are exactly zero (e.g. {P}{V}.lora_B.weight): those modules "
                                    "were never updated")


# -- registration ----------------------------------------------------------------------------------


def test_every_static_check_is_registered_with_its_texts():
    from harness.checks import checks

    registered = {c.id: c for c in checks("static")}
    assert registered["empty-tensors"].fix == static.ZERO3_FIX
    assert static.ZERO3_FIX.startswith("save under ZeRO-3 only after gathering: wrap save_pretrained in "
                                       "deepspeed.zero.GatheredParameters(params, modifier_rank=None) on all ranks")
    for check in registered.values():
        assert check.func is getattr(static, f"check_{check.id.replace('-', '_')}")
    assert os.path.basename(static.__file__) == "static.py"
