"""Exported directories load like real ones; adapters are reproducible; the seed report reproduces."""

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.compat import DTYPE_KW
from harness.numerics.probes import make_probe
from harness.synthetic import BundleSpec, build_bundle, build_model
from harness.synthetic.cache import cached_build

FRESH_PROCESS_LOAD = r"""
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
d, dtype_kw = sys.argv[1], {sys.argv[4]: torch.float32}  # dtype= or torch_dtype=, by transformers version
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, **dtype_kw).eval()
also = AutoModel.from_pretrained(d, trust_remote_code=True, **dtype_kw).eval()
probe = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    a = model(inputs_embeds=probe["embeds"], im_mask=probe["mask"]).logits
    b = also(inputs_embeds=probe["embeds"], im_mask=probe["mask"]).logits
torch.save({"a": a, "b": b}, sys.argv[3])
print(json.dumps({"harness_imported": any(m == "harness" or m.startswith("harness.") for m in sys.modules),
                  "class": type(model).__name__}))
"""


@pytest.mark.parametrize("variant", ["ixc2", pytest.param("ixc2-4khd", marks=pytest.mark.slow)])  # one fast, one slow
def test_export_loads_in_a_fresh_process_without_harness(variant, make_bundle, tmp_path):
    base_dir = make_bundle(variant=variant).base_dir
    names = {p.name for p in base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_internlm_xcomposer2.py", "tokenizer.json"} <= names
    config = json.loads((base_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
    assert config["architectures"] == ["InternLMXComposer2ForCausalLM"]

    model = build_model(variant)
    probe = make_probe(model.get_input_embeddings())
    with torch.no_grad():
        want = model(inputs_embeds=probe.inputs_embeds, im_mask=probe.im_mask).logits
    torch.save({"embeds": probe.inputs_embeds, "mask": probe.im_mask}, tmp_path / "probe.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_LOAD)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, str(script), str(base_dir), str(tmp_path / "probe.pt"), str(tmp_path / "out.pt"),
                          DTYPE_KW],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info == {"harness_imported": False, "class": "InternLMXComposer2ForCausalLM"}
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got["a"], want) and torch.equal(got["b"], want)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_trained_adapter_is_reproducible_bit_for_bit(tmp_path):
    spec = BundleSpec(variant="ixc2")
    one = build_bundle(spec, tmp_path / "one")
    two = build_bundle(spec, tmp_path / "two")
    tensors = load_file(one.adapter_dir / "adapter_model.safetensors")
    again = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert tensors.keys() == again.keys()
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert _digest(one.base_dir) == _digest(two.base_dir)
    assert all(tensors[k].abs().max() > 0 for k in tensors if "lora_B" in k), "training must make lora_B non-zero"


def test_adapter_keys_follow_the_official_recipe(default_bundle):
    keys = set(load_file(default_bundle.adapter_dir / "adapter_model.safetensors"))
    for module in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        assert f"base_model.model.model.layers.0.{module}.lora_A.weight" in keys
        assert f"base_model.model.model.layers.1.{module}.lora_B.weight" in keys
    assert not any("Plora" in k or "GN" in k or ".default." in k for k in keys)
    config = json.loads((default_bundle.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("variant", ["ixc2", "ixc2.5"])
def test_seed_report_load_state_dict_of_adapter_fails_with_plora_keys_missing(variant, make_bundle):
    """The seed report: ``model.load_state_dict(adapter)`` — an adapter is not a state dict."""
    bundle = make_bundle(variant=variant)
    model = build_model(variant)
    adapter = load_file(bundle.adapter_dir / "adapter_model.safetensors")
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(adapter)
    text = str(err.value)
    assert "Missing key(s)" in text and "Unexpected key(s)" in text
    assert "model.layers.0.attention.wqkv.Plora_A.weight" in text
    assert "model.layers.1.feed_forward.w2.Plora_B.weight" in text
    assert ("plora_glb_GN" in text and "plora_sub_GN" in text) == (variant != "ixc2")


def test_cached_build_runs_once_under_concurrency(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(1)
        (out / "x").write_text("done")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_build(tmp_path, "t", {"k": 1}, build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "x").read_text() == "done"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t-")], "no half-built leftovers"


def test_cached_build_leaves_nothing_on_failure(tmp_path):
    def broken(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_build(tmp_path, "t", {"k": 2}, broken)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
