"""The real-model suite's code, run in the default suite on synthetic model directories: quirk diagnostics
on deliberately broken directories, and the whole merged/unmerged/generation/reload run on CPU, including
broken merges and broken merged checkpoints that it must catch."""

import json
import re
import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from fixtures.gpu.quirks import RealModelError, diagnose_dir
from fixtures.gpu.real_model import RealModelRun, compare_generations, image_text_prompt, load_real_model
from harness.model.remote_code import explain_load_error
from harness.synthetic import BundleSpec, build_bundle, build_model, export_model

CLIP = "openai/clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return export_model(build_model("ixc2.5"), tmp_path_factory.mktemp("real") / "base")


@pytest.fixture
def copy_of(base_dir, tmp_path, request):
    """A copy of the base dir, named after the test: transformers keys remote-code modules by folder name and
    code hash and reuses a config class's registered model class, so copies must not share a name."""
    def make():
        return shutil.copytree(base_dir, tmp_path / re.sub(r"\W", "_", request.node.name)[:60])

    return make


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def one_line(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text


# -- static diagnostics -------------------------------------------------------------------------

def test_a_clean_directory_has_no_quirks_and_loads(base_dir):
    assert diagnose_dir(base_dir) == []
    loaded = load_real_model(base_dir, dtype=torch.float32, device="cpu")
    assert loaded.quirks == [] and loaded.tokenizer is not None


def test_flash_attention_in_config_is_explained_and_loaded_eager(copy_of):
    model_dir = copy_of()
    edit_json(model_dir / "config.json", attn_implementation="flash_attention_2")
    [quirk] = diagnose_dir(model_dir)
    assert quirk.id == "flash-attention" and quirk.where.endswith("config.json")
    assert "attn_implementation='eager'" in quirk.fix and one_line(quirk.sentence())
    loaded = load_real_model(model_dir, dtype=torch.float32, device="cpu")  # the harness asks for eager
    assert any("loaded with attn_implementation='eager'" in n for n in loaded.notes), loaded.notes
    assert getattr(loaded.model.config, "_attn_implementation", None) in (None, "eager")  # absent on 4.33
    assert getattr(loaded.model.config, "attn_implementation", None) in (None, "eager")


@pytest.mark.parametrize("cached, offline, severity", [(False, True, "error"), (False, False, "warning"),
                                                      (True, True, "note")])
def test_a_vision_tower_from_the_hub_in_config(copy_of, isolated_hub, monkeypatch, cached, offline, severity):
    model_dir = copy_of()
    edit_json(model_dir / "config.json", vision_tower=CLIP)
    if cached:
        (isolated_hub / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "abc").mkdir(parents=True)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [quirk] = diagnose_dir(model_dir)
    assert (quirk.id, quirk.severity) == ("hub-download", severity)
    assert quirk.where == f"{model_dir / 'config.json'} (vision_tower)" and CLIP in quirk.problem
    if severity == "error":
        with pytest.raises(RealModelError) as err:
            load_real_model(model_dir, dtype=torch.float32, device="cpu")
        message = str(err.value)
        assert one_line(message) and "config.json (vision_tower)" in message
        assert f"huggingface-cli download {CLIP}" in message and "HF_HUB_OFFLINE" in message
    else:
        load_real_model(model_dir, dtype=torch.float32, device="cpu")  # the synthetic code never downloads


def test_a_hub_download_in_the_remote_code_names_file_and_line(copy_of, isolated_hub, monkeypatch):
    model_dir = copy_of()
    code = model_dir / "build_mlp.py"
    code.write_text(code.read_text() + (
        "\n\ndef build_vision_tower():\n"
        f"    vision_tower = '{CLIP}'\n"
        "    return CLIPVisionModel.from_pretrained(vision_tower)\n"))
    line = code.read_text().splitlines().index(f"    vision_tower = '{CLIP}'") + 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [quirk] = diagnose_dir(model_dir)
    assert quirk.where == f"{code}:{line}" and quirk.severity == "error"


def test_strings_that_are_not_hub_ids_are_left_alone(copy_of):
    model_dir = copy_of()
    code = model_dir / "build_mlp.py"
    code.write_text(code.read_text() + "\nMIME = 'image/png'\nNOTE = 'a/b c'\nLOCAL = 'vision/x'\n")
    (model_dir / "vision").mkdir()
    (model_dir / "vision" / "x").mkdir()  # exists inside the model dir: a local path
    assert diagnose_dir(model_dir) == []


def test_missing_auto_map_and_missing_code_file_are_errors(copy_of, tmp_path):
    model_dir = copy_of()
    config = json.loads((model_dir / "config.json").read_text())
    auto_map = dict(config["auto_map"])
    del auto_map["AutoModelForCausalLM"]
    edit_json(model_dir / "config.json", auto_map=auto_map)
    (model_dir / "configuration_internlm_xcomposer2.py").unlink()
    found = {q.id: q for q in diagnose_dir(model_dir)}
    assert found["auto-map"].severity == "error"
    sentences = " | ".join(q.sentence() for q in diagnose_dir(model_dir))
    assert '"AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"' in sentences
    assert "configuration_internlm_xcomposer2.py, which is not in the directory" in sentences

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RealModelError, match="no auto_map"):
        load_real_model(plain, dtype=torch.float32, device="cpu")
    with pytest.raises(RealModelError, match="no config.json"):
        load_real_model(tmp_path / "nowhere", dtype=torch.float32, device="cpu")


def test_code_reading_self_tokenizer_gets_a_note(copy_of):
    model_dir = copy_of()
    code = model_dir / "modeling_internlm_xcomposer2.py"
    code.write_text(code.read_text() + "\n\ndef chat(self, query):\n    return self.tokenizer(query)\n")
    [quirk] = diagnose_dir(model_dir)
    assert quirk.id == "tokenizer-attribute" and quirk.severity == "note"
    assert quirk.where.startswith(str(code) + ":") and "model.tokenizer = AutoTokenizer" in quirk.fix


def test_rotary_buffers_are_not_judged_from_the_code_alone(copy_of):
    """A register_buffer(..., persistent=False) says nothing about whether the loader fills it: the engine
    compares loaded buffers with the constructor's (tests/test_remote_code_quirks.py), the code scan stays quiet."""
    model_dir = copy_of()
    (model_dir / "extra_rotary.py").write_text(
        "import torch\nclass R(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.register_buffer('inv_freq', torch.ones(2), persistent=False)\n")
    assert not [q for q in diagnose_dir(model_dir) if q.id == "rotary-buffers"]


# -- behavioural diagnostics ---------------------------------------------------------------------

def test_im_mask_none_crash_is_located_and_the_run_still_passes(tmp_path):
    model_dir = export_model(build_model("ixc2.5", legacy_none_mask_crash=True), tmp_path / "legacy")
    loaded = load_real_model(model_dir, dtype=torch.float32, device="cpu")
    [quirk] = [q for q in loaded.quirks if q.id == "im-mask-none"]
    code = (model_dir / "build_mlp.py").read_text().splitlines()
    file, line = quirk.where.rsplit(":", 1)
    assert file == str(model_dir / "build_mlp.py") and "im_mask.view" in code[int(line) - 1]
    assert "always pass a bool im_mask" in quirk.fix
    result = RealModelRun(model_dir, workdir=tmp_path / "run", dtype=torch.float32, device="cpu", lora_r=4,
                          max_new_tokens=3).run()
    assert result.ok, result.problems  # the harness never passes im_mask=None


def test_a_model_that_ignores_im_mask_is_refused(copy_of):
    model_dir = copy_of()
    code = model_dir / "modeling_internlm_xcomposer2.py"
    text = code.read_text()
    assert "im_mask=im_mask," in text
    code.write_text(text.replace("im_mask=im_mask,", "im_mask=None,", 1))
    with pytest.raises(RealModelError) as err:
        load_real_model(model_dir, dtype=torch.float32, device="cpu")
    message = str(err.value)
    assert one_line(message) and message.startswith(str(code)) and "ignores im_mask" in message


def test_nan_logits_after_loading_are_refused(tmp_path):
    model = build_model("ixc2")
    with torch.no_grad():
        model.model.layers[0].attention.wo.weight[0, 0] = float("nan")
    model_dir = export_model(model, tmp_path / "nan")
    with pytest.raises(RealModelError, match="NaN/inf logits"):
        load_real_model(model_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("err, expect", [
    (ImportError("flash_attn seems to be not installed"), "install flash-attn"),
    (ModuleNotFoundError("No module named 'decord'", name="decord"), "pip install decord"),
    (OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {CLIP}."),
     f"huggingface-cli download {CLIP}"),
    (OSError("Can't load '/tmp/x/model': model.safetensors not found"), "loading failed (OSError: Can't load"),
    (KeyError("type"), "transformers 4.x"),
    (RuntimeError("something else\nmore"), "loading failed (RuntimeError: something else)"),
])
def test_load_errors_are_explained_in_one_sentence(err, expect, tmp_path):
    sentence = explain_load_error(err, tmp_path)
    assert expect in sentence and one_line(sentence) and "fix:" in sentence


# -- the run --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_with_a_synthesised_adapter_passes(base_dir, tmp_path, dtype):
    result = RealModelRun(base_dir, workdir=tmp_path, dtype=dtype, device="cpu", lora_r=8, max_new_tokens=4).run()
    assert result.ok, result.problems
    assert result.adapter_source.startswith("synthesised") and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert set(result.comparisons) == {"probe", "text_probe"} and all(c["ok"] for c in result.comparisons.values())
    assert result.outputs["probe"]["image"]["effect_rel_output"] > 0.05
    assert result.generation["equal"] and len(result.generation["merged"]) == 4
    assert result.reload["missing_keys"] == [] and result.reload["bit_identical"]
    assert (tmp_path / "merged" / "modeling_internlm_xcomposer2.py").is_file()  # the merge script copies the code
    figures = result.figures()
    assert figures["ok"] and figures["dtype"] == str(dtype).replace("torch.", "")
    json.dumps(figures, allow_nan=False)


def test_run_with_a_given_trained_adapter_passes(tmp_path):
    bundle = build_bundle(BundleSpec(variant="ixc2"), cache_root=tmp_path / "cache")
    result = RealModelRun(bundle.base_dir, bundle.adapter_dir, workdir=tmp_path / "run", dtype=torch.float32,
                          device="cpu", max_new_tokens=3).run()
    assert result.ok, result.problems
    assert result.adapter_source == "given" and result.adapter_dir == str(bundle.adapter_dir)


class MisScaledMerge(RealModelRun):
    def merge(self, peft_model):
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.scaling["default"] *= 3
        return super().merge(peft_model)


def test_a_mis_scaled_merge_fails_image_and_text_rows(base_dir, tmp_path):
    result = MisScaledMerge(base_dir, workdir=tmp_path, dtype=torch.float32, device="cpu", lora_r=8,
                            max_new_tokens=4).run()
    text = "\n".join(result.problems)
    assert "merged vs unmerged (probe): image rows" in text and "merged vs unmerged (text probe)" in text
    assert "OUTSIDE the float32 tolerance" in text


class DropsPloraA(RealModelRun):
    """A merged checkpoint saved without one PLoRA tensor: it reloads re-initialised, with no error."""

    def save_merged(self, model, out):
        super().save_merged(model, out)
        path = out / "model.safetensors"
        tensors = load_file(path)
        del tensors["model.layers.1.attention.wqkv.Plora_A.weight"]
        save_file(tensors, path, metadata={"format": "pt"})
        return out


def test_a_merged_checkpoint_missing_a_tensor_fails_the_reload(base_dir, tmp_path):
    result = DropsPloraA(base_dir, workdir=tmp_path, dtype=torch.float32, device="cpu", lora_r=8,
                         max_new_tokens=2).run()
    assert result.reload["missing_keys"] == ["model.layers.1.attention.wqkv.Plora_A.weight"]
    assert any("missing and re-initialised, e.g. model.layers.1.attention.wqkv.Plora_A.weight" in p
               for p in result.problems), result.problems
    assert not result.reload["bit_identical"]


def test_generation_comparison_separates_near_ties_from_disagreements():
    steps = [torch.tensor([10.0, 9.0, 0.0]), torch.tensor([5.0, 4.99, 0.0])]
    same = compare_generations(([0, 0], steps), ([0, 0], steps), dtype=torch.bfloat16)
    assert same["equal"] and same["first_difference"] is None
    wide = compare_generations(([0, 0], steps), ([1, 0], steps), dtype=torch.bfloat16)
    assert (wide["first_difference"], wide["near_tie"]) == (0, False) and wide["margin_rel"] == pytest.approx(0.1)
    tie = compare_generations(([0, 0], steps), ([0, 1], steps), dtype=torch.bfloat16)
    assert (tie["first_difference"], tie["near_tie"]) == (1, True)


def test_prompt_lays_out_text_image_text(base_dir):
    loaded = load_real_model(base_dir, dtype=torch.float32, device="cpu", check_behaviour=False)
    prompt = image_text_prompt(loaded.model.get_input_embeddings(), loaded.tokenizer, image_rows=5, seed=1)
    mask = prompt.im_mask[0].tolist()
    start = mask.index(True)
    assert sum(mask) == 5 and mask[start:start + 5] == [True] * 5 and start > 0 and len(mask) > start + 5
    assert re.fullmatch(r"image\+text prompt, 5 image rows", prompt.description)
    no_tokenizer = image_text_prompt(loaded.model.get_input_embeddings(), None, image_rows=3, seed=1)
    assert no_tokenizer.im_mask.sum() == 3 and no_tokenizer.inputs_embeds.shape[1] == 4 + 3 + 12


@pytest.mark.parametrize("offline, severity", [(False, "warning"), (True, "error")])
def test_a_url_download_in_the_remote_code_names_file_and_line(copy_of, monkeypatch, offline, severity):
    """IXC2.5's get_font() fetches SimHei.ttf with urlopen from __init__: no network, no model."""
    model_dir = copy_of()
    code = model_dir / "build_mlp.py"
    url = "https://huggingface.co/internlm/internlm-xcomposer2d5-7b/resolve/main/SimHei.ttf?download=true"
    code.write_text(code.read_text() + (
        "\n\nfrom urllib.request import urlopen\n\n"
        "def get_font():\n"
        f"    truetype_url = '{url}'\n"
        "    return urlopen(truetype_url)\n"))
    line = code.read_text().splitlines().index(f"    truetype_url = '{url}'") + 1
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    [quirk] = diagnose_dir(model_dir)
    assert (quirk.id, quirk.severity, quirk.where) == ("url-download", severity, f"{code}:{line}")
    assert url in quirk.problem and "\n" not in quirk.sentence()


def test_urls_in_code_that_fetches_nothing_are_left_alone(copy_of):
    model_dir = copy_of()
    code = model_dir / "configuration_internlm_xcomposer2.py"
    code.write_text(code.read_text() + "\nHOMEPAGE = 'https://github.com/InternLM/InternLM-XComposer'\n")
    assert diagnose_dir(model_dir) == []
