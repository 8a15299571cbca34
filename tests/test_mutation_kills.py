"""Behaviour pinned down by mutation testing (scripts/mutation-test.sh): each test here kills mutants that the
other fast tests let survive. They assert statuses, details and the parts of messages a user acts on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness.checks import static

# -- static helpers --------------------------------------------------------------------------------


def test_examples_and_more_cut_lists_where_documented():
    assert static._examples(range(10)) == [0, 1, 2, 3, 4]
    assert static._examples(range(10), 2) == [0, 1]
    assert static._more(3) == ""
    assert static._more(4) == " (+1 more)"
    assert static._more(5, 1) == " (+4 more)"
    assert static._more(1, 1) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (False, True), ("", True), ([], True), ({}, True), ({"a": None, "b": {"c": []}}, True),
     (0, False), ("x", False), ([0], False), ({"a": 1}, False), (True, False)],
)
def test_default_looking_values(value, expected):
    assert static._default_looking(value) is expected


def test_rejected_names_peft_its_first_line_and_the_exception():
    got = static._rejected("0.99", ValueError("first line\nsecond line"))
    assert (got.status, got.message) == ("fail", "PEFT 0.99 rejects this config: first line")
    assert got.details == {"exception": "ValueError"}
    assert static._rejected("0.99", KeyError()).message == "PEFT 0.99 rejects this config: KeyError"
    long = static._rejected("1", RuntimeError("x" * 300)).message
    assert long == "PEFT 1 rejects this config: " + "x" * 200


def test_config_fix_for_regex_problems():
    fix = static._config_fix([static.ConfigProblem("r", "fine"),
                              static.ConfigProblem("target_modules", "anything", regex=True)])
    assert fix.startswith("write target_modules as a list of module names, or a simple regex PEFT can match")
    assert fix.endswith("rank_pattern / alpha_pattern keys are regexes too")


def test_config_fix_for_value_problems():
    fix = static._config_fix([static.ConfigProblem("r", "r must be a positive integer, not 0")])
    assert fix == ("regenerate adapter_config.json with save_pretrained, with r a positive integer and lora_alpha a "
                   "positive finite number")
    # chosen by the problem's kind, not its words: a value problem that mentions a regex keeps the value fix
    assert static._config_fix([static.ConfigProblem("target_modules", "not a regular expression, nor a list")]) == fix


def test_shown_cuts_long_values_to_the_limit():
    assert static._shown("a" * 58) == repr("a" * 58)  # 60 characters with the quotes: kept
    cut = static._shown("a" * 59)  # 61 characters: cut to 59 + the ellipsis
    assert cut == "'" + "a" * 58 + "…" and len(cut) == 60
    assert static._shown([1, 2], limit=4) == "[1,…"
    assert static._shown(10**5000) == "an integer of about 5000 digits"


class _FakeInfo(SimpleNamespace):
    pass


class _FakeFile:
    def __init__(self, name, tensors):
        self.name = name
        self._tensors = tensors
        self.tensors = {k: _FakeInfo(shape=tuple(v.shape), dtype=v.dtype) for k, v in tensors.items()}
        self.released = []

    def get_tensor(self, key):
        return self._tensors[key]

    def release(self, key):
        self.released.append(key)


def test_compare_files_lists_every_kind_of_difference():
    t = torch.ones(2, 2)
    first = _FakeFile("a.safetensors", {"k1": t, "k2": t, "k3": t, "k4": t, "only_a1": t, "only_a2": t})
    second = _FakeFile("b.bin", {"k1": torch.ones(3, 2), "k2": t.double(), "k3": t * 2, "k4": t, "only_b": t})
    diffs = static._compare_files(first, second)
    assert diffs == [
        "2 key(s) only in a.safetensors, e.g. only_a1",
        "1 key(s) only in b.bin, e.g. only_b",
        "3 tensor(s) differ, e.g. k1 (torch.float32[2, 2] vs torch.float32[3, 2])",
    ]
    assert first.released == ["k3", "k4"]
    second = _FakeFile("b.bin", {"k2": t.double(), "k3": t * 2, "only_b": t, "only_b0": t})
    first = _FakeFile("a.safetensors", {"k2": t, "k3": t})
    assert static._compare_files(first, second) == [
        "2 key(s) only in b.bin, e.g. only_b",
        "2 tensor(s) differ, e.g. k2 (torch.float32[2, 2] vs torch.float64[2, 2])",
    ]
    first = _FakeFile("a.safetensors", {"k3": t})
    assert static._compare_files(first, _FakeFile("b.bin", {"k3": t * 2})) == ["1 tensor(s) differ, e.g. k3"]
    assert static._compare_files(first, _FakeFile("b.bin", {"k3": t})) == []


# -- numerics.reference ----------------------------------------------------------------------------


def test_shared_parameters_are_only_the_tied_ones():
    from harness.numerics.reference import shared_parameters

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
    model["b"].weight = model["a"].weight
    assert shared_parameters(model) == {id(model["a"].weight)}


def _copy(param, role="modules_to_save", key="k"):
    return SimpleNamespace(param=param, role=role, key=key)


def test_apply_copy_refuses_what_does_not_fit():
    from harness.numerics.reference import _apply_copy

    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 3)})
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    skipped: list[str] = []
    assert _apply_copy(modules, params, _copy("lin.nothing", key="k1"), torch.zeros(3), skipped) is False
    assert _apply_copy(modules, params, _copy("lin.bias", key="k2"), torch.zeros(4), skipped) is False
    assert skipped == ["k1: no base parameter lin.nothing of shape [3]", "k2: no base parameter lin.bias of shape [4]"]


def test_apply_copy_modules_to_save_becomes_a_frozen_parameter_of_the_base_dtype_and_device():
    from harness.numerics.reference import _apply_copy

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}).to(torch.float16)
    model["b"].weight = model["a"].weight
    before = model["a"].weight.detach().clone()
    modules, params = dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False))
    value = torch.full((2, 2), 0.5, dtype=torch.float32)
    assert _apply_copy(modules, params, _copy("b.weight"), value, []) is True
    new = model["b"].weight
    assert new.dtype == torch.float16 and not new.requires_grad and torch.equal(new, value.half())
    assert torch.equal(model["a"].weight, before)  # the tied partner keeps the base value

    meta = torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2)}).to("meta")
    modules, params = dict(meta.named_modules()), dict(meta.named_parameters())
    assert _apply_copy(modules, params, _copy("b.weight"), value, []) is True
    assert meta["b"].weight.device.type == "meta"


def test_apply_copy_other_roles_load_into_the_base_parameter():
    from harness.numerics.reference import _apply_copy

    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 2)}).to(torch.float64)
    bias = model["lin"].bias
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    value = torch.tensor([1.25, -2.0])
    with torch.no_grad():  # as apply_adapter_reference calls it
        assert _apply_copy(modules, params, _copy("lin.bias", role="bias"), value, []) is True
    assert model["lin"].bias is bias and bias.dtype == torch.float64
    assert torch.equal(bias, value.double())


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.embed


def _probe(feed):
    from harness.numerics.probes import ProbeBatch

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    im_mask = torch.tensor([[False, True, False], [True, False, False]])
    return ProbeBatch(input_ids=ids, inputs_embeds=torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
                      im_mask=im_mask, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), feed=feed)


def test_probe_inputs_by_feed():
    from harness.numerics.reference import probe_inputs

    model = _TinyLM().to(torch.float64)
    probe = _probe("input_ids")
    got = probe_inputs(model, probe, mask="im_mask")
    assert set(got) == {"attention_mask", "input_ids", "im_mask"}
    assert torch.equal(got["input_ids"], probe.input_ids) and torch.equal(got["im_mask"], probe.im_mask)
    assert torch.equal(got["attention_mask"], probe.attention_mask)
    assert set(probe_inputs(model, probe, mask=None)) == {"attention_mask", "input_ids"}
    assert set(probe_inputs(model, probe)) == {"attention_mask", "input_ids"}  # a generic model: no mask keyword

    probe = _probe("embeds")
    got = probe_inputs(model, probe, mask="im_mask")
    assert set(got) == {"attention_mask", "inputs_embeds", "im_mask"}
    assert got["inputs_embeds"].dtype == torch.float64 and torch.equal(got["inputs_embeds"], probe.inputs_embeds.double())

    probe = _probe("model-embeds")
    got = probe_inputs(model, probe, mask="im_mask")
    assert set(got) == {"attention_mask", "inputs_embeds", "im_mask"}
    text = model.embed(probe.input_ids)
    want = torch.where(probe.im_mask[..., None], probe.inputs_embeds.double(), text)
    assert got["inputs_embeds"].dtype == torch.float64 and torch.equal(got["inputs_embeds"], want)


@pytest.mark.parametrize("feed", ["input_ids", "embeds", "model-embeds"])
def test_probe_inputs_follow_the_model_device(feed):
    from harness.numerics.reference import probe_inputs

    model = _TinyLM().to("meta")
    seen = []
    model.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    got = probe_inputs(model, _probe(feed))
    assert {name: value.device.type for name, value in got.items()} == {name: "meta" for name in got}
    assert seen == (["meta"] if feed == "model-embeds" else [])  # the token ids reach the embedding on its device


def test_probe_inputs_model_embeds_keep_a_low_precision_dtype():
    from harness.numerics.reference import probe_inputs

    model = _TinyLM().to(torch.bfloat16)
    probe = _probe("model-embeds")
    got = probe_inputs(model, probe)["inputs_embeds"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[probe.im_mask], probe.inputs_embeds[probe.im_mask].to(torch.bfloat16))


def test_finite_output_reads_tensors_in_any_container_and_ignores_padding():
    from harness.numerics.reference import _finite_output

    real = torch.tensor([[True, True], [False, True]])
    bad_at_padding = torch.zeros(2, 2, 3)
    bad_at_padding[1, 0, 0] = float("nan")
    bad_at_real = torch.zeros(2, 2, 3)
    bad_at_real[0, 1, 2] = float("inf")
    assert _finite_output(bad_at_padding, real) is True
    assert _finite_output(bad_at_real, real) is False
    assert _finite_output({"x": "no tensor", "y": bad_at_real}, real) is False
    assert _finite_output((None, bad_at_real), real) is False
    assert _finite_output([bad_at_real], real) is False
    assert _finite_output([bad_at_padding], real) is True
    assert _finite_output("text", real) is True
    assert _finite_output(None, real) is True  # a module that returns nothing
    assert _finite_output(3, real) is True
    assert _finite_output(torch.tensor([1, 2]), real) is True  # integer outputs are never non-finite
    two_d = torch.zeros(2, 2)
    two_d[1, 0] = float("nan")
    assert _finite_output(two_d, real) is True  # a [B, T] output is masked too
    two_d[0, 0] = float("nan")
    assert _finite_output(two_d, real) is False
    other = torch.zeros(3, 3)
    other[2, 2] = float("nan")
    assert _finite_output(other, real) is False  # not [B, T, ...]: every element counts


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("base_model.model.m.q_proj.lora_B.default", "m.q_proj (its lora_B)"),
        ("base_model.model.m.q_proj.base_layer", "m.q_proj"),
        ("m.lm_head.modules_to_save.default", "m.lm_head (its modules_to_save)"),
        ("m.x.original_module", "m.x (its original_module)"),
        ("base_model.model.m.layers.0.mlp", "m.layers.0.mlp"),
        ("m.wqkv.Plora_A", "m.wqkv.Plora_A"),
    ],
)
def test_base_module_name(name, expected):
    from harness.numerics.reference import _base_module_name

    assert _base_module_name(name) == expected


# -- loading.records -------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(4, 4)
        self.emb = torch.nn.Embedding(6, 4)


@pytest.fixture(scope="module")
def lora_net():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_Net(), LoraConfig(r=2, target_modules=["q", "emb"]), adapter_name="other")


def test_adapter_owned_names_every_adapter_parameter(lora_net):
    from harness.loading.records import _adapter_owned

    assert _adapter_owned(lora_net, "other") == {
        "base_model.model.q.lora_A.other.weight",
        "base_model.model.q.lora_B.other.weight",
        "base_model.model.emb.lora_embedding_A.other",
        "base_model.model.emb.lora_embedding_B.other",
    }
    assert _adapter_owned(lora_net, "default") == set()


def test_note_load_result_keeps_adapter_keys_and_names_the_noise(lora_net):
    from harness.loading.records import LoadRecord, _note_load_result

    record = LoadRecord(path="p", missing_keys=["earlier-missing"], unexpected_keys=["earlier-unexpected"])
    result = SimpleNamespace(
        missing_keys=["base_model.model.q.lora_A.other.weight", "base_model.model.q.base_layer.weight",
                      "base_model.model.x.Plora_A.weight", "base_model.model.y.plora_glb_GN"],
        unexpected_keys=["base_model.model.z.lora_B.other.weight", "stray.weight"],
    )
    _note_load_result(record, lora_net, result, "other")
    assert record.missing_keys == ["base_model.model.q.lora_A.weight", "earlier-missing"]
    assert record.unexpected_keys == ["base_model.model.z.lora_B.weight", "earlier-unexpected", "stray.weight"]
    assert record.notes == [
        "load_result: 1 missing adapter keys, 2 unexpected keys",
        "PEFT also lists 2 non-adapter key(s) containing 'lora_' as missing (e.g. base_model.model.x.Plora_A.weight): "
        "PLoRA names, ignored",
    ]


def test_note_load_result_without_lists(lora_net):
    from harness.loading.records import LoadRecord, _note_load_result

    record = LoadRecord(path="p")
    _note_load_result(record, lora_net, object(), "other")
    _note_load_result(record, lora_net, SimpleNamespace(missing_keys=None, unexpected_keys=None), "other")
    assert record.notes == ["load_result: 0 missing adapter keys, 0 unexpected keys"] * 2
    assert record.clean


# -- static: shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "parts", "expected"),
    [
        ({"r": 2}, {}, (None, None)),
        ({"r": 2}, {"lora_magnitude_vector": (4,)}, (None, None)),
        ({"r": 2}, {"lora_A": (2, 3)}, ("m: lora_A without lora_B", None)),
        ({"r": 2}, {"lora_B": (4, 2)}, ("m: lora_B without lora_A", None)),
        ({"r": 2}, {"lora_A": (2, 3, 1), "lora_B": (4, 2)}, ("m: lora_A[2, 3, 1] / lora_B[4, 2] are not matrices", None)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2, 1)}, ("m: lora_A[2, 3] / lora_B[4, 2, 1] are not matrices", None)),
        ({"r": 8}, {"lora_A": (2, 3), "lora_B": (4, 2)}, ("m: rank 2 [2, 3]/[4, 2] but the config's r gives 8", None)),
        ({"r": 8, "rank_pattern": {"m": 4}}, {"lora_A": (2, 3), "lora_B": (4, 2)},
         ("m: rank 2 [2, 3]/[4, 2] but the config's rank_pattern gives 4", None)),
        ({"r": 8, "rank_pattern": {"other": 4}}, {"lora_A": (2, 3), "lora_B": (4, 2)},
         ("m: rank 2 [2, 3]/[4, 2] but the config's r gives 8", None)),
        ({"r": 4, "rank_pattern": {"m": 4}}, {"lora_A": (2, 3), "lora_B": (4, 2)},
         ("m: rank 2 [2, 3]/[4, 2] but the config's r gives 4", None)),
        ({}, {"lora_A": (2, 3), "lora_B": (4, 2)}, (None, 2)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2), "lora_magnitude_vector": (5,)},
         ("m: lora_magnitude_vector [5] does not match lora_B out 4", None)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2), "lora_magnitude_vector": (1, 4, 1, 1)}, (None, 2)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2), "lora_B.bias": (3,)},
         ("m: lora_B.bias [3] does not match lora_B out 4", None)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2), "lora_B.bias": (4,)}, (None, 2)),
        ({"r": 2}, {"lora_embedding_A": (2, 10), "lora_embedding_B": (4, 2), "lora_embedding_B.bias": (4,)},
         ("m: lora_embedding_B.bias [4] does not match lora_embedding_B out 4 (PEFT has no lora_bias for a "
          "nn.Embedding)", None)),
        ({"r": 2}, {"lora_A": (2, 3), "lora_B": (4, 2)}, (None, 2)),
    ],
)
def test_module_shape_problem(config, parts, expected):
    # a dotted module name: peft 0.8 matches rank_pattern keys only after a dot, later versions also at the start
    message, rank = expected
    assert static._module_shape_problem(config, "x.m", parts) == (message and f"x.{message}", rank)


def test_rank_problem_bounds():
    assert static._rank_problem("r", 1) is None
    assert static._rank_problem("r", 65_536) is None
    assert static._rank_problem("r", 0) == "r must be a positive integer, not 0"
    assert static._rank_problem("r", "8") == "r must be a positive integer, not '8'"
    assert static._rank_problem("r", 65_537) == "r is 65537, over 65,536: no LoRA rank is that large"


def test_alpha_problem_bounds():
    assert static._alpha_problem("a", 1) is None
    assert static._alpha_problem("a", 0.5) is None
    assert static._alpha_problem("a", 1_000_000) is None
    assert static._alpha_problem("a", "x") == "a must be a number, not 'x'"
    assert static._alpha_problem("a", True) == "a must be a number, not True"
    assert static._alpha_problem("a", float("inf")) == "a is inf, not a finite number"
    assert static._alpha_problem("a", 0) == "a is 0: the LoRA scaling is zero, the adapter does nothing"
    assert static._alpha_problem("a", -1) == "a is negative (-1): the LoRA scaling alpha/r must be positive"
    assert static._alpha_problem("a", 1e7) == (
        "a is 10000000.0, over 1,000,000: the scaling alpha/r would swamp the base weights")


def test_config_of_a_context_without_adapter_is_empty():
    from harness.checks import CheckContext

    assert static._config(CheckContext()) == {}
    assert static._config(CheckContext(adapter=SimpleNamespace(config=["not", "a", "dict"]))) == {}
    assert static._config(CheckContext(adapter=SimpleNamespace(config={"r": 2}))) == {"r": 2}


# -- static: config values -------------------------------------------------------------------------

GOOD_CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q"]}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"target_modules": "q|k"}, []),
        ({"target_modules": None, "bias": "lora_only"}, []),
        ({"r": 0, "lora_alpha": 0}, [("r", "r must be a positive integer, not 0"),
                                     ("lora_alpha", "lora_alpha is 0: the LoRA scaling is zero, the adapter does nothing")]),
        ({"target_modules": 5}, [("target_modules", "target_modules must be a non-empty list of names or a regex string, not 5")]),
        ({"target_modules": ""}, [("target_modules", "target_modules must be a non-empty list of names or a regex string, not ''")]),
        ({"target_modules": []}, [("target_modules", "target_modules must be a non-empty list of names or a regex string, not []")]),
        ({"target_modules": ["q", 1]},
         [("target_modules", "target_modules must be a non-empty list of names or a regex string, not ['q', 1]")]),
        ({"bias": None}, [("bias", "bias must be 'none', 'all' or 'lora_only', not None")]),
        ({"bias": "sometimes"}, [("bias", "bias must be 'none', 'all' or 'lora_only', not 'sometimes'")]),
        ({"alpha_pattern": {"x": 0}},
         [("alpha_pattern", "alpha_pattern['x'] is 0: the LoRA scaling is zero, the adapter does nothing")]),
        ({"rank_pattern": [1], "alpha_pattern": {"x": "y"}},
         [("rank_pattern", "rank_pattern must map module patterns to numbers, not [1]"),
          ("alpha_pattern", "alpha_pattern['x'] must be a number, not 'y'")]),
        ({"rank_pattern": {"w": 0, "v": 2}}, [("rank_pattern", "rank_pattern['w'] must be a positive integer, not 0")]),
    ],
)
def test_scalar_problems_name_the_field(changes, expected):
    assert static._scalar_problems({**GOOD_CONFIG, **changes}) == [static.ConfigProblem(*e) for e in expected]


def test_pattern_problems_compile_then_time_every_pattern(monkeypatch):
    import harness.inputs.patterns as patterns

    seen = []

    def fake_bounded_matches(pattern, names):
        seen.append((pattern.field, pattern.raw, list(names)))
        if pattern.raw == "slow":
            raise patterns.PatternTooCostly("rank_pattern key 'slow' is too costly")
        return []

    monkeypatch.setattr(patterns, "bounded_matches", fake_bounded_matches)
    config = {**GOOD_CONFIG, "target_modules": "(", "rank_pattern": {"slow": 2, "fast": 2}}
    found = static._pattern_problems(config, ["n1", "n2"])
    bad = patterns.config_patterns(config)[0]
    assert found == [static.ConfigProblem("target_modules", patterns.compile_problem(bad), regex=True),
                     static.ConfigProblem("rank_pattern", "rank_pattern key 'slow' is too costly", regex=True)]
    assert "is not a valid regular expression" in found[0].text
    assert seen == [("rank_pattern", "slow", ["n1", "n2"]), ("rank_pattern", "fast", ["n1", "n2"])]
    assert static._pattern_problems(GOOD_CONFIG, ["n1"]) == []


# -- static: what the input is ---------------------------------------------------------------------


def _ctx(keys=(), *, foreign=(), adapter_files=("adapter_model.safetensors",), model_config=None,
         config_path="adapter_config.json", primary="adapter", config=None):
    from harness.checks import CheckContext

    adapter = SimpleNamespace(
        tensors={k: None for k in keys}, config=config if config is not None else dict(GOOD_CONFIG),
        foreign_files=[SimpleNamespace(name=n) for n in foreign], adapter_files=list(adapter_files),
        model_config=model_config, config_path=config_path,
        primary=None if primary is None else SimpleNamespace(role=primary),
    )
    return CheckContext(adapter=adapter)


P = "base_model.model."
LORA_KEYS = [f"{P}m.q.lora_A.weight", f"{P}m.q.lora_B.weight"]


def test_full_checkpoint_reasons():
    reason = static.full_checkpoint_reason
    assert reason(_ctx(foreign=["a.safetensors", "b.bin", "c.pt", "d.pt"], model_config={}, config_path=None)) == (
        "a full model directory (config.json + a.safetensors, b.bin, c.pt) with no adapter_config.json: "
        "a merged or base model, not an adapter")
    assert reason(_ctx(foreign=["a.safetensors"], model_config=None, config_path=None)) is None  # no keys
    assert reason(_ctx(foreign=["a.safetensors"], model_config={}, config_path="adapter_config.json")) is None
    assert reason(_ctx()) is None
    assert reason(_ctx(LORA_KEYS)) is None
    assert reason(_ctx([f"{P}m.q.base_layer.weight", *LORA_KEYS])) == (
        f"1 of 3 keys are base weights (e.g. {P}m.q.base_layer.weight): a full PeftModel state_dict(), "
        "not the adapter save_pretrained writes")
    assert reason(_ctx([f"{P}m.x.weight", f"{P}m.y.weight"])) == (
        f"none of the 2 keys is a LoRA tensor (e.g. {P}m.x.weight): a full or merged model state dict, not an adapter")
    assert reason(_ctx([f"{P}m.wqkv.Plora_A.weight"])) == (
        f"none of the 1 keys is a LoRA tensor (e.g. {P}m.wqkv.Plora_A.weight): a full or merged model state dict, "
        "not an adapter")
    assert reason(_ctx([*LORA_KEYS, f"{P}m.x.weight", f"{P}m.y.weight", f"{P}m.wqkv.Plora_A.weight"])) == (
        f"3 of 5 keys are not LoRA tensors (e.g. {P}m.x.weight): a model state dict with LoRA tensors inside, "
        "not an adapter")
    assert reason(_ctx([*LORA_KEYS, f"{P}m.x.weight", f"{P}m.y.weight"])) is None  # as many LoRA as other keys
    assert reason(_ctx(LORA_KEYS, foreign=["model.safetensors", "x.bin", "y.bin", "z.bin"], adapter_files=())) == (
        "only model weight files (model.safetensors, x.bin, y.bin), no adapter_model.safetensors/.bin")
    assert reason(_ctx(LORA_KEYS, foreign=["model.safetensors"])) is None


def test_data_unavailable_reasons():
    from harness.checks import CheckContext

    assert static._data_unavailable(CheckContext()) == "no adapter given"
    assert static._data_unavailable(_ctx(LORA_KEYS, primary=None)) == "no readable weights file (see weights-readable)"
    assert static._data_unavailable(_ctx(LORA_KEYS, primary="foreign")) == "not an adapter (see full-checkpoint)"
    assert static._data_unavailable(_ctx([f"{P}m.x.weight"])) == "not an adapter (see full-checkpoint)"
    assert static._data_unavailable(_ctx(LORA_KEYS)) is None


def test_module_names_add_the_adapters_modules_to_the_typical_ones():
    from harness.checks import CheckContext

    probes = list(static.PROBE_NAMES)
    assert static._module_names(CheckContext()) == probes
    assert static._module_names(_ctx(LORA_KEYS, primary=None)) == probes
    keys = [f"{P}z.lora_A.weight", f"{P}z.lora_B.weight", *LORA_KEYS, f"{P}m.x.weight"]
    assert static._module_names(_ctx(keys)) == [*probes, "m.q", "z"]


# -- numerics.reference: expected deltas -----------------------------------------------------------


def _dora_adapter():
    """Two modules; ``a`` has a lora_B bias and (where the installed PEFT knows DoRA) a DoRA magnitude."""
    from harness import compat

    g = torch.Generator().manual_seed(0)
    tensors = {f"{P}a.lora_A.weight": torch.randn(2, 3, generator=g), f"{P}a.lora_B.weight": torch.randn(4, 2, generator=g),
               f"{P}b.lora_A.weight": torch.randn(2, 3, generator=g), f"{P}b.lora_B.weight": torch.randn(4, 2, generator=g),
               f"{P}a.lora_B.bias": torch.randn(4, generator=g)}
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["a", "b"], "lora_bias": True}
    if compat.peft_supports("use_dora"):  # peft 0.8 (the oldest stack) has no DoRA and no magnitude part
        tensors[f"{P}a.lora_magnitude_vector"] = torch.rand(4, generator=g) + 1
        config["use_dora"] = True
    return config, tensors


def test_expected_deltas_carry_magnitude_bias_and_kind():
    from harness.model.layer_kinds import CONV1D, LINEAR
    from harness.numerics.reference import expected_deltas

    config, tensors = _dora_adapter()
    deltas = expected_deltas(config, tensors)
    assert sorted(deltas) == ["a", "b"]
    a = deltas["a"]
    assert a.kind is LINEAR and a.scaling == 2.0 and a.rank == 2
    if config.get("use_dora"):
        assert torch.equal(a.magnitude, tensors[f"{P}a.lora_magnitude_vector"])
    else:
        assert a.magnitude is None
    assert torch.allclose(a.bias_delta, 2.0 * tensors[f"{P}a.lora_B.bias"])
    assert torch.allclose(a.delta, 2.0 * tensors[f"{P}a.lora_B.weight"] @ tensors[f"{P}a.lora_A.weight"])
    assert deltas["b"].magnitude is None and deltas["b"].bias_delta is None

    only_a = expected_deltas(config, tensors, targets={"a"}, kinds={"a": CONV1D, "b": LINEAR})
    assert list(only_a) == ["a"]
    assert only_a["a"].kind is CONV1D and only_a["a"].fan_in_fan_out is True
    assert tuple(only_a["a"].delta.shape) == (3, 4)


def test_module_delta_layout_follows_the_kind():
    from harness.model.layer_kinds import CONV1D, EMBEDDING, LINEAR
    from harness.numerics.reference import ModuleDelta

    delta = torch.zeros(2, 2)
    assert ModuleDelta("m", delta, 1.0, 1).kind is LINEAR
    assert ModuleDelta("m", delta, 1.0, 1).fan_in_fan_out is False
    flagged = ModuleDelta("m", delta, 1.0, 1, fan_in_fan_out=True)
    assert flagged.kind is CONV1D and flagged.fan_in_fan_out is True
    embedding = ModuleDelta("m", delta, 1.0, 1, fan_in_fan_out=True, kind=EMBEDDING)
    assert embedding.kind is EMBEDDING and embedding.fan_in_fan_out is True
    assert ModuleDelta("m", delta, 1.0, 1, kind=EMBEDDING).fan_in_fan_out is True


# -- loading.records: what was loaded --------------------------------------------------------------


def test_same_values_for_integer_tensors():
    from harness.loading.records import same_values

    assert same_values(torch.tensor([1, 2]), torch.tensor([1, 2])) is True
    assert same_values(torch.tensor([1, 2]), torch.tensor([1, 3])) is False
    assert same_values(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0])) is True
    assert same_values(torch.tensor([1.0]), torch.tensor([1.0, 1.0])) is False


def test_record_coverage_compares_keys_and_values(monkeypatch):
    import peft.utils

    from harness.loading.records import LoadRecord, _record_coverage

    saved = {
        "same": torch.tensor([1.0, 2.0]),
        "reshaped": torch.tensor([1.0, 2.0]),
        "changed": torch.tensor([1.0, 2.0]),
        "rounded": torch.tensor([1.001, 2.0]),  # held in bf16: the file's value rounded is loaded
        "only_saved": torch.tensor([0.0]),
    }
    held = {
        "same": torch.tensor([1.0, 2.0]),
        "reshaped": torch.tensor([[1.0, 2.0]]),
        "changed": torch.tensor([1.0, 2.5]),
        "rounded": torch.tensor([1.001, 2.0]).to(torch.bfloat16),
        "only_held": torch.tensor([0.0]),
    }
    calls = []

    def fake_state_dict(model, adapter_name):
        calls.append((model, adapter_name))
        return held

    monkeypatch.setattr(peft.utils, "get_peft_model_state_dict", fake_state_dict)
    record = LoadRecord(path="p", missing_keys=["earlier"], unexpected_keys=["earlier-u"])
    _record_coverage(record, "model", saved, "other")
    assert calls == [("model", "other")]
    assert record.missing_keys == ["earlier", "only_held"]
    assert record.unexpected_keys == ["earlier-u", "only_saved"]
    assert record.not_loaded == ["changed", "reshaped"]
    assert not record.clean


# -- numerics.compare ------------------------------------------------------------------------------


def _comparison(**changes):
    from harness.numerics.compare import Comparison

    fields = dict(label="lbl", dtype="float32", tolerance=1e-4, image_max_abs=1e-3, image_max_rel=2e-3,
                  text_max_abs=3e-3, text_max_rel=4e-3, worst_row=("image", 1, 2), ok=True)
    return Comparison(**{**fields, **changes})


def test_comparison_summary_states_the_numbers_the_worst_row_and_the_verdict():
    rows = "lbl: image rows max abs 1.00e-03 (rel 2.00e-03), text rows max abs 3.00e-03 (rel 4.00e-03)"
    assert _comparison(cause="ignored when ok").summary() == (
        f"{rows}; worst at image row batch 1 position 2; within the float32 tolerance 1e-04")
    assert _comparison(ok=False, worst_row=("", -1, -1), cause="the head was re-tied").summary() == (
        f"{rows}; OUTSIDE the float32 tolerance 1e-04; the head was re-tied")
    assert _comparison(ok=False, non_finite="first produced by m.q").summary() == (
        "lbl: non-finite outputs (NaN/Inf) in real rows, first produced by m.q")
    assert _comparison(ok=False, non_finite="first produced by m.q", cause="c").summary() == (
        "lbl: non-finite outputs (NaN/Inf) in real rows, first produced by m.q; c")
    assert _comparison().to_dict()["worst_row"] == ("image", 1, 2)
    assert set(_comparison().to_dict()) == {"label", "dtype", "tolerance", "image_max_abs", "image_max_rel",
                                            "text_max_abs", "text_max_rel", "worst_row", "ok", "non_finite", "cause",
                                            "bands", "basis"}
    calibrated = _comparison(ok=False, bands={"image": 0.2, "text": 0.1}, basis="3x the noise")
    assert calibrated.summary().endswith("OUTSIDE the float32 tolerance (image 2.0e-01, text 1.0e-01: 3x the noise)")


def test_compare_row_classes_numbers_and_worst_row():
    from harness.numerics.compare import compare

    probe = _probe("embeds")  # image rows: (0, 1); text rows: (0, 0), (0, 2), (1, 1), (1, 2); (1, 0) is padding
    ref = torch.full((2, 3, 4), 2.0)
    ref[0, 1] = 4.0  # the image rows' scale
    got = ref.clone()
    got[0, 1, 3] += 0.4  # image: abs 0.4, rel 0.1
    got[1, 2, 0] -= 0.3  # text: abs 0.3, rel 0.15 (the worst, relative to its scale)
    got[1, 0] = 1e6  # padding: ignored
    result = compare(got, ref, probe, dtype=torch.float32, label="p", cause="why")
    assert (result.label, result.dtype, result.tolerance, result.ok) == ("p", "float32", 1e-4, False)
    assert result.image_max_abs == pytest.approx(0.4) and result.image_max_rel == pytest.approx(0.1)
    assert result.text_max_abs == pytest.approx(0.3, rel=1e-5) and result.text_max_rel == pytest.approx(0.15, rel=1e-5)
    assert result.worst_row == ("text", 1, 2)
    assert result.non_finite is None and result.cause == "why"
    loose = compare(got, ref, probe, dtype=torch.float32, label="p", tolerance=0.2)
    assert loose.ok and loose.tolerance == 0.2
    # each class against its own scale: image 0.4 <= 0.12 * 4, text 0.3 > 0.12 * 2
    assert not compare(got, ref, probe, dtype=torch.float32, label="p", tolerance=0.12).ok
    image_worst = got.clone()
    image_worst[0, 1, 3] += 0.4  # image rel 0.2 now
    assert compare(image_worst, ref, probe, dtype=torch.float32, label="p").worst_row == ("image", 0, 1)
    tie = ref.clone()
    tie[0, 1, 0] += 0.4  # image rel 0.1
    tie[0, 2, 0] += 0.2  # text rel 0.1: a tie keeps the first class
    assert compare(tie, ref, probe, dtype=torch.float32, label="p").worst_row == ("image", 0, 1)
    assert compare(ref.clone(), ref, probe, dtype=torch.float32, label="p").worst_row == ("image", 0, 0)


def test_compare_bounds_small_outputs_by_the_absolute_floor():
    from harness.numerics.compare import compare

    probe = _probe("embeds")
    ref = torch.full((2, 3, 4), 1e-3)
    got = ref + 5e-6  # rel 5e-3 of the scale, but under fp32's atol 1e-5
    assert compare(got, ref, probe, dtype=torch.float32, label="p").ok
    assert not compare(got, ref, probe, dtype=torch.float32, label="p", tolerance=1e-4).ok  # no floor then
    assert not compare(ref + 2e-5, ref, probe, dtype=torch.float32, label="p").ok
    assert compare(ref + 2e-5, ref, probe, dtype=torch.float32, label="p").tolerance == 1e-4
    bf16 = compare(got, ref, probe, dtype=torch.bfloat16, label="p")
    assert (bf16.dtype, bf16.tolerance, bf16.ok) == ("bfloat16", 5e-2, True)


def test_compare_non_finite_outputs_and_references():
    from harness.numerics.compare import compare, finite_rows

    probe = _probe("embeds")
    ref = torch.ones(2, 3, 4)
    got = ref.clone()
    got[1, 0, 0] = float("nan")  # padding
    assert finite_rows(got, probe) and compare(got, ref, probe, dtype=torch.float32, label="p").ok
    got[1, 1, 2] = float("nan")
    assert not finite_rows(got, probe)
    result = compare(got, ref, probe, dtype=torch.float32, label="p")
    assert (result.ok, result.non_finite) == (False, "source not located")
    assert result.text_max_abs == float("inf") and result.worst_row == ("text", 1, 1)
    named = compare(got, ref, probe, dtype=torch.float32, label="p", non_finite="first produced by m")
    assert named.non_finite == "first produced by m"
    bad_ref = ref.clone()
    bad_ref[0, 2, 0] = float("nan")  # a non-finite reference: its rows still count as the worst
    result = compare(ref.clone(), bad_ref, probe, dtype=torch.float32, label="p")
    assert result.worst_row == ("text", 0, 2) and not result.ok


def test_compare_without_image_rows():
    from harness.numerics.compare import compare

    probe = _probe("embeds")
    probe.im_mask = torch.zeros_like(probe.im_mask)
    ref = torch.ones(2, 3, 4)
    result = compare(ref + 1e-3, ref, probe, dtype=torch.float32, label="p")
    assert (result.image_max_abs, result.image_max_rel) == (0.0, 0.0)
    assert result.text_max_abs == pytest.approx(1e-3, rel=1e-3) and result.worst_row[0] == "text"


def test_pairwise_disagreements_use_twice_the_tolerance():
    from harness.numerics.compare import compare, pairwise_disagreements

    probe = _probe("embeds")
    a = torch.ones(2, 3, 4)
    b = a + 1.5e-4  # outside fp32's 1e-4 alone, inside the pairwise 2e-4
    c = a + 1e-2
    problems = pairwise_disagreements({"a": a, "b": b, "c": c}, probe, dtype=torch.float32)
    expected = [compare(a, c, probe, dtype=torch.float32, label="a vs c", tolerance=2e-4).summary(),
                compare(b, c, probe, dtype=torch.float32, label="b vs c", tolerance=2e-4).summary()]
    assert problems == expected
    assert problems[0].startswith("a vs c: ") and "OUTSIDE the float32 tolerance 2e-04" in problems[0]
    assert pairwise_disagreements({"a": a, "b": b}, probe, dtype=torch.float32) == []
    assert pairwise_disagreements({"a": a, "b": b}, probe, dtype=torch.bfloat16) == []
    bands = {"image": 1e-4, "text": 1e-4}  # calibrated bands double the same way
    assert pairwise_disagreements({"a": a, "b": b}, probe, dtype=torch.float32, bands=bands) == []
    assert len(pairwise_disagreements({"a": a, "c": c}, probe, dtype=torch.float32, bands=bands)) == 1


# -- loading.raw_load ------------------------------------------------------------------------------


def _adapter_file(directory, tensors):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def _tiny_base():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"q": torch.nn.Linear(2, 2)})


def test_raw_load_of_an_adapter_fails_and_says_why(tmp_path):
    from harness.loading.raw_load import PEFT_NOT_STATE_DICT, diagnose_raw_load

    adapter = _adapter_file(tmp_path / "a", {f"{P}q.lora_A.weight": torch.ones(1, 2), f"{P}q.lora_B.weight": torch.ones(2, 1)})
    got = diagnose_raw_load(_tiny_base(), adapter)
    assert (got.failed, got.error_type, got.missing_plora, got.missing_total, got.unexpected_total) == (
        True, "RuntimeError", [], 2, 2)
    assert got.unexpected_examples == [f"{P}q.lora_A.weight", f"{P}q.lora_B.weight"]
    assert got.message == (f"{PEFT_NOT_STATE_DICT} (load_state_dict: 2 missing keys; 2 unexpected adapter keys such as "
                           f"{P}q.lora_A.weight)")
    empty = diagnose_raw_load(_tiny_base(), _adapter_file(tmp_path / "e", {}))
    assert empty.failed and empty.message == f"{PEFT_NOT_STATE_DICT} (load_state_dict: 2 missing keys; 0 unexpected adapter keys)"
    assert (empty.unexpected_examples, empty.error_type) == ([], "RuntimeError")


def test_raw_load_judges_overlapping_files_by_keys_and_never_loads_them(tmp_path):
    from harness.loading.raw_load import PEFT_NOT_STATE_DICT, diagnose_raw_load

    model = _tiny_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extras = {f"x{i}": torch.zeros(1) for i in range(7)}
    got = diagnose_raw_load(model, _adapter_file(tmp_path / "o", {"q.weight": torch.zeros(2, 2), **extras}))
    assert (got.failed, got.error_type, got.missing_total, got.unexpected_total) == (True, "RuntimeError", 1, 7)
    assert got.unexpected_examples == ["x0", "x1", "x2", "x3", "x4"]
    assert got.message == f"{PEFT_NOT_STATE_DICT} (load_state_dict: 1 missing keys; 7 unexpected adapter keys such as x0)"
    full = diagnose_raw_load(model, _adapter_file(tmp_path / "f", {"q.weight": torch.zeros(2, 2), "q.bias": torch.zeros(2)}))
    assert (full.failed, full.error_type, full.missing_total, full.unexpected_total) == (False, None, 0, 0)
    assert full.message == "load_state_dict accepted the adapter file: it is a full state dict"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_raw_load_from_a_base_directory_names_the_plora_keys(default_bundle):
    from harness.inputs.adapter_dir import read_adapter_tensors
    from harness.loading.base import load_base
    from harness.loading.raw_load import PEFT_NOT_STATE_DICT, diagnose_raw_load
    from harness.model.families.xcomposer import XComposer

    family = XComposer()  # the synthetic base's family: its branch keys, as the diagnosis names them
    own = set(load_base(default_bundle.base_dir, dtype=torch.float32, device="cpu").state_dict())
    saved = set(read_adapter_tensors(default_bundle.adapter_dir))
    missing, unexpected = sorted(own - saved), sorted(saved - own)
    plora = [k for k in missing if family.is_branch_param(k)]
    got = diagnose_raw_load(str(default_bundle.base_dir), default_bundle.adapter_dir)
    assert plora and got.missing_plora == plora
    assert (got.failed, got.error_type, got.missing_total, got.unexpected_total) == (
        True, "RuntimeError", len(missing), len(unexpected))
    assert got.unexpected_examples == unexpected[:5]
    assert got.message == (f"{PEFT_NOT_STATE_DICT} (load_state_dict: {len(missing)} missing keys, including {len(plora)} "
                           f"PLoRA keys such as {', '.join(family.branch_key_examples(plora))}; {len(unexpected)} "
                           f"unexpected adapter keys such as {unexpected[0]})")


def test_raw_load_edge_cases(tmp_path):
    from harness.loading.raw_load import PEFT_NOT_STATE_DICT, diagnose_raw_load

    nothing = diagnose_raw_load(torch.nn.Module(), _adapter_file(tmp_path / "none", {}))
    assert (nothing.failed, nothing.error_type, nothing.missing_plora) == (False, None, [])
    missing_only = diagnose_raw_load(_tiny_base(), _adapter_file(tmp_path / "m", {"q.weight": torch.zeros(2, 2)}))
    assert (missing_only.failed, missing_only.error_type, missing_only.missing_total) == (True, "RuntimeError", 1)
    assert missing_only.message == f"{PEFT_NOT_STATE_DICT} (load_state_dict: 1 missing keys; 0 unexpected adapter keys)"
    full = diagnose_raw_load(_tiny_base(), _adapter_file(tmp_path / "f", {"q.weight": torch.zeros(2, 2),
                                                                           "q.bias": torch.zeros(2)}))
    assert (full.failed, full.missing_plora, full.unexpected_examples) == (False, [], [])


def test_compare_edge_rows_and_bounds():
    from harness.numerics.compare import compare, pairwise_disagreements

    probe = _probe("embeds")
    padded = _probe("embeds")
    padded.attention_mask = torch.zeros_like(padded.attention_mask)  # no real row at all
    ref = torch.full((2, 3, 4), 2.0)
    nothing = compare(ref + 1, ref, padded, dtype=torch.float32, label="p")
    assert nothing.worst_row == ("", -1, -1) and nothing.ok and nothing.text_max_abs == 0.0
    at_bound = compare(ref + 1, ref, probe, dtype=torch.float32, label="p", tolerance=0.5)  # |3 - 2| == 0.5 * 2
    assert at_bound.ok and at_bound.text_max_abs == 1.0
    assert not compare(ref + 1, ref, probe, dtype=torch.float32, label="p", tolerance=0.25).ok
    a = torch.ones(2, 3, 4)
    assert pairwise_disagreements({"a": a, "c": a + 1e-2}, probe, dtype=torch.bfloat16) == []  # 2 x bf16's 5e-2
