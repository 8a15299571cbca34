#!/usr/bin/env python3
"""Fidelity run: plora-harness against the REAL InternLM-XComposer-2.5 remote code, at tiny dims, on the CPU.

What it does (everything under --work; the checkout is only read):
  1. copies the real IXC2.5 remote code (``*.py`` of ``internlm-xcomposer2d5-ol-7b/base``) into a model
     directory laid out like the real repo (``<work>/layout/internlm-xcomposer2d5-ol-7b/base``), applies the
     minimal offline edits listed below, writes a tiny config.json (with ``auto_map``), builds the model with
     seeded deterministic weights and saves it with ``save_pretrained`` (safetensors);
  2. keeps a VERBATIM copy (``<work>/verbatim/internlm-xcomposer2d5-ol-7b/base``: the same config.json, weights and
     tokenizer files, the code untouched, so ``__init__`` calls ``urlopen``);
  3. trains adapters the official way (finetune/finetune.py of the XComposer repo: ViT frozen, everything under
     ``model.model`` frozen, ``LoraConfig(r=alpha, dropout 0.05, target_modules=attention.wqkv, attention.wo,
     feed_forward.w1, feed_forward.w2, feed_forward.w3, bias none, CAUSAL_LM)``, a few AdamW steps on
     ``inputs_embeds`` + bool ``im_mask``), saves them with ``save_pretrained`` and merges the good one with the
     official recipe (finetune/merge_peft_adapter.py: ``PeftModel.from_pretrained`` -> ``merge_and_unload`` ->
     ``save_pretrained`` + the base's ``*.py`` and tokenizer files) in fp32 and bf16;
  3b. saves the same tiny model in bf16 as the released checkpoints are (``<work>/artefacts/base_bf16``: loaded in
     bf16, ``save_pretrained``, config.json ``torch_dtype`` bfloat16) and merges the good adapter into it with the
     official recipe in bf16; the bf16 cases run with the harness's default dtype (the checkpoint's stored one);
  4. makes good and broken cases, each with an expected verdict, and runs
     ``PYTHON -m harness.cli check --adapter A --base-model B [--merged M] --json OUT --quiet``
     (+ ``--trust-remote-code`` when ``check --help`` lists it) in a subprocess per case, with HF_HUB_OFFLINE=1;
  5. prints one table (case | expected | got | RIGHT/WRONG) and the stack; exit 0 only if every verdict is right.

Getting the checkout (the public InternLM/InternLM-XComposer repository; only the IXC2.5 *.py are needed):
    git clone https://github.com/InternLM/InternLM-XComposer /path/to/InternLM-XComposer
  or, from a bare mirror without a work tree (large blobs such as SimHei.ttf may be absent from it):
    mkdir -p /work/fidelity/xcomposer
    git --git-dir=/work/.mirror/InternLM+InternLM-XComposer/repo archive HEAD -- \\
        InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base \\
        InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/merge_lora \\
        ':(exclude)*.ttf' ':(exclude)*/examples/*' | tar -x -C /work/fidelity/xcomposer
  then pass ``--xcomposer /work/fidelity/xcomposer`` (the folder that holds InternLM-XComposer-2.5-OmniLive/).

Running it (torch and torchvision: see the note below; the harness under test installed with --no-deps -e):
    python3 -m venv /work/fidelity/venv-457
    /work/fidelity/venv-457/bin/pip install torch==2.14.1 torchvision==0.29.1 'transformers==4.57.*' peft==0.21.2 \\
        safetensors einops pillow decord filelock tokenizers
    /work/fidelity/venv-457/bin/pip install --no-deps -e /path/to/plora-harness
    /work/fidelity/venv-457/bin/python scripts/real_xcomposer_fidelity.py --xcomposer /work/fidelity/xcomposer \\
        --work /work/fidelity/run-457 --stack-label "current: transformers 4.57 / peft 0.21" \\
        --json-out /work/fidelity/run-457/table.json
    python3 -m venv /work/fidelity/venv-433
    /work/fidelity/venv-433/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.33.3 tokenizers==0.13.3 \
        huggingface-hub==0.36.2 accelerate==0.27.2 peft==0.8.2 safetensors einops pillow decord filelock
    /work/fidelity/venv-433/bin/pip install --no-deps -e /path/to/plora-harness
    /work/fidelity/venv-433/bin/python scripts/real_xcomposer_fidelity.py --xcomposer /work/fidelity/xcomposer \
        --work /work/fidelity/run-433 --stack-label "oldest: transformers 4.33.3 / peft 0.8.2" \
        --json-out /work/fidelity/run-433/table.json
  Each case's command, stdout, stderr and JSON report stay in <work>/cases/<case>/; a case takes 10-40 s and the
  build 20-60 s on 2 cores (about 10 minutes per stack); the artefacts are reused while the stack and code match.
  Options: --python (the interpreter whose ``harness`` is tested; default this one), --cases a,b (subset),
  --timeout seconds per case, --rebuild (ignore artefacts already in --work).
  torchvision note: the real code imports torchvision at import time. The PyPI torchvision wheels are CUDA builds
  that do not import beside the local torch 2.13.0+cpu ('operator torchvision::nms does not exist': _C.so needs
  libtorch_cuda.so); torch 2.14.1 + torchvision 0.29.1 (CUDA builds, they run on the CPU) is the pair that imports.

Offline edits to the real code (applied to the edited copy only, each printed; none touches PLoRA, attention,
the decoder layers or any forward):
  E1 build_mlp.py, CLIPVisionTower.load_model: ``CLIPVisionModel.from_pretrained('internlm-xcomposer2d5-ol-7b/
     base/IXC2d5_clip_l_560')`` (a relative path to a CLIP-L dir that is not in the repository) becomes
     ``CLIPVisionModel(CLIPVisionConfig(**<tiny CLIP config>))``; the tower's weights then come from the model's
     own checkpoint (``vit.vision_tower.*``) like every other weight.
  E2 ixc_utils.py, get_font: ``urlopen(<huggingface.co .../SimHei.ttf>)`` + ``ImageFont.truetype(ff, size=40)``
     becomes ``ImageFont.load_default()`` (Pillow's built-in font; the font is only drawn on video frames).
  Not edited, handled by the caller as a user must: ``attn_implementation`` (config default flash_attention_2)
  is set to eager when loading here; the config.json written keeps "flash_attention_2" like the published one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

SUBDIR = "InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b"
LAYOUT_REL = "internlm-xcomposer2d5-ol-7b/base"  # how the real code (and its users) lay the model out
TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
BUILD_VERSION = 4  # bump when the artefacts change

TINY_CONFIG = {  # IXC2.5's config.json at tiny dims (hidden 64, 2 layers, GQA 4/2 heads)
    "architectures": ["InternLMXComposer2ForCausalLM"],
    "attn_implementation": "flash_attention_2",
    "auto_map": {
        "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
        "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
    },
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_length": 16384,
    "max_position_embeddings": 2048,
    "model_type": "internlm2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 1024,
}
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 560, "patch_size": 14, "projection_dim": 64}
TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
    "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "InternLM2Tokenizer",
}

# (file, what, why, exact old text, new text): each old text must occur exactly once in the checkout's file.
EDITS = [
    ("build_mlp.py", "E1 CLIP tower built from a local tiny config",
     "CLIPVisionModel.from_pretrained('internlm-xcomposer2d5-ol-7b/base/IXC2d5_clip_l_560') reads a CLIP-L "
     "directory that is not in the repository (relative to the working directory)",
     "self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name)",
     "self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**" + repr(TINY_CLIP) + "))"
     "  # fidelity edit E1: was CLIPVisionModel.from_pretrained(self.vision_tower_name)"),
    ("ixc_utils.py", "E2 font: Pillow's built-in font instead of urlopen(SimHei.ttf)",
     "get_font() downloads SimHei.ttf from huggingface.co with urlopen inside InternLMXComposer2ForCausalLM.__init__",
     "    ff = urlopen(truetype_url)\n    font = ImageFont.truetype(ff, size=40)",
     "    font = ImageFont.load_default()  # fidelity edit E2: was urlopen(truetype_url) + ImageFont.truetype(ff, 40)"),
]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def say(text: str) -> None:
    print(text, flush=True)


def find_code_dir(checkout: Path) -> Path:
    for cand in (checkout / SUBDIR / "base", checkout / "internlm-xcomposer2d5-ol-7b" / "base", checkout):
        if (cand / "modeling_internlm_xcomposer2.py").is_file() and (cand / "build_mlp.py").is_file():
            return cand
    sys.exit(f"real_xcomposer_fidelity: no IXC2.5 remote code under {checkout} (expected {SUBDIR}/base/*.py); "
             "see the docstring for how to get the checkout")


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def copy_code(src_dir: Path, dst_dir: Path, *, edit: bool) -> list[str]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_dir.glob("*.py")):
        shutil.copyfile(path, dst_dir / path.name)
    applied = []
    if edit:
        for fname, what, why, old, new in EDITS:
            target = dst_dir / fname
            text = target.read_text()
            if text.count(old) != 1:
                sys.exit(f"real_xcomposer_fidelity: edit {what!r} expects its text exactly once in {fname}; "
                         "the checkout differs from the one this script was written for")
            line = text[: text.index(old)].count("\n") + 1
            target.write_text(text.replace(old, new))
            applied.append(f"{fname}:{line}: {what} (why: {why})")
    return applied


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    if (src_dir / "tokenizer.model").is_file():
        shutil.copyfile(src_dir / "tokenizer.model", dst_dir / "tokenizer.model")
    (dst_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def urlopen_line(code_dir: Path) -> int | None:
    for n, line in enumerate((code_dir / "ixc_utils.py").read_text().splitlines(), 1):
        if re.search(r"\burlopen\s*\(", line):
            return n
    return None


# ---------------------------------------------------------------------------------------------------------------
# building (in this process: torch, transformers, peft, safetensors)


class Stack:
    def __init__(self) -> None:
        import peft
        import torch
        import transformers

        self.torch, self.transformers, self.peft = torch, transformers, peft
        tv = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        self.dtype_kw = "dtype" if tv >= (4, 56) else "torch_dtype"
        self.attn_kwarg = tv >= (4, 36)

    def versions(self) -> str:
        return (f"torch {self.torch.__version__}, transformers {self.transformers.__version__}, "
                f"peft {self.peft.__version__}")

    def load(self, model_dir: Path, dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        config.attn_implementation = "eager"  # the real code's own switch (its default is flash_attention_2)
        kwargs = {"config": config, "trust_remote_code": True, self.dtype_kw: dtype}
        if self.attn_kwarg:
            kwargs["attn_implementation"] = "eager"
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def seeded_init(stack: Stack, model) -> None:
    """Deterministic weights from per-name seeds (independent of init order and of the stack)."""
    torch = stack.torch
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("_GN"):
                value = 0.02 * noise
            elif "tok_embeddings" in name or (param.dim() == 2 and "embedding" in name):
                value = noise
            elif param.dim() >= 2:
                fan_in = param.shape[1] * (param[0, 0].numel() if param.dim() > 2 else 1)
                value = noise / fan_in ** 0.5
            elif leaf == "bias":
                value = 0.02 * noise
            else:  # norm weights
                value = 1.0 + 0.1 * noise
            param.copy_(value.to(param.dtype))


def build_bf16_base(stack: Stack, layout_base: Path, out: Path) -> None:
    """The same model as released: weights in bf16 (``save_pretrained`` of the model loaded in bf16), config.json
    naming bfloat16 (``torch_dtype``, as the published config does; ``dtype`` too where this transformers wrote it)."""
    torch = stack.torch
    model = stack.load(layout_base, torch.bfloat16)
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for path in sorted(layout_base.iterdir()):  # the same code and tokenizer files
        if path.is_file() and path.name not in ("config.json", "model.safetensors") and not path.name.endswith(
                ".index.json"):
            shutil.copyfile(path, out / path.name)
    cfg = json.loads((layout_base / "config.json").read_text())  # the published config, dtype changed only
    cfg["torch_dtype"] = "bfloat16"
    if "dtype" in json.loads((out / "config.json").read_text()):
        cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    from safetensors import safe_open

    with safe_open(str(weights_file(out)), framework="pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    say(f"  bf16 base: tensors stored as {dtypes} -> {out}")
    del model


def build_base(stack: Stack, code_src: Path, layout_base: Path, scratch: Path) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch = stack.torch
    src = scratch / "edited_src"
    if src.exists():
        shutil.rmtree(src)
    applied = copy_code(code_src, src, edit=True)
    (src / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2) + "\n")
    config = AutoConfig.from_pretrained(src, trust_remote_code=True)
    config.attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    seeded_init(stack, model)
    model.eval()
    if layout_base.exists():
        shutil.rmtree(layout_base)
    model.save_pretrained(layout_base, safe_serialization=True)
    for path in src.glob("*.py"):
        shutil.copyfile(path, layout_base / path.name)
    copy_tokenizer(code_src, layout_base)
    saved = json.loads((layout_base / "config.json").read_text())
    saved["attn_implementation"] = TINY_CONFIG["attn_implementation"]  # as published (the build ran eager)
    saved["max_length"] = TINY_CONFIG["max_length"]  # as published (transformers >= 4.41 moves it out on save)
    (layout_base / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    say(f"  base: {n / 1e6:.1f} M parameters -> {layout_base}")
    return applied


def make_batch(stack: Stack, model, seed: int):
    torch = stack.torch
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    ids = torch.randint(4, emb.weight.shape[0], (2, 24), generator=gen)
    im_mask = torch.zeros(2, 24, dtype=torch.bool)
    im_mask[:, 4:16] = True
    with torch.no_grad():
        embeds = emb(ids)
        rms = embeds.pow(2).mean().sqrt()
        image = torch.randn(embeds.shape, generator=gen) * rms
        embeds = torch.where(im_mask[..., None], image, embeds)
    return embeds, im_mask, ids


def train_adapter(stack: Stack, base: Path, out: Path, *, targets: list[str], steps: int, r: int = 16) -> str:
    """finetune.py's LoRA recipe: ViT frozen, model.model frozen, get_peft_model, AdamW on inputs_embeds + im_mask."""
    from peft import LoraConfig, get_peft_model

    torch = stack.torch
    torch.manual_seed(1)
    model = stack.load(base, torch.float32)
    model.vit.requires_grad_(False)  # fix_vit=True
    model.vision_proj.requires_grad_(True)  # fix_sampler=False (the default); PEFT re-freezes it
    for _, param in model.model.named_parameters():
        param.requires_grad = False
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    peft_model.train()
    losses = []
    for step in range(steps):
        embeds, im_mask, labels = make_batch(stack, model, seed=100 + step)
        out_ = peft_model(inputs_embeds=embeds, im_mask=im_mask, labels=labels)
        losses.append(round(float(out_.loss.detach()), 3))
        if not out_.loss.requires_grad:  # e.g. LoRA only on the CLIP tower, which inputs_embeds never reach
            losses.append("no gradient reaches the LoRA weights")
            break
        out_.loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(out)
    del peft_model, model
    return f"{n_trainable} trainable parameters, losses {losses}"


def official_merge(stack: Stack, base: Path, adapter: Path, out: Path, dtype) -> None:
    """merge_peft_adapter.py: AutoModelForCausalLM(trust_remote_code) -> PeftModel -> merge_and_unload -> save."""
    from peft import PeftModel

    model = stack.load(base, dtype)
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    model = model.merge_and_unload()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for path in sorted(base.iterdir()):  # the base's code and tokenizer files, as the recipe ships them
        if path.is_file() and (path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens"))):
            shutil.copyfile(path, out / path.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attn_implementation"] = json.loads((base / "config.json").read_text()).get("attn_implementation")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # the merge ran eager only because of the CPU
    del model


def weights_file(model_dir: Path) -> Path:
    path = model_dir / "model.safetensors"
    if not path.is_file():
        sys.exit(f"real_xcomposer_fidelity: {model_dir} has no single model.safetensors (sharded save?)")
    return path


def variant_of(src: Path, dst: Path, mutate) -> None:
    """A copy of model dir ``src`` whose weights are ``mutate(dict)``."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = dict(load_file(str(weights_file(src))))
    mutate(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})


def adapter_deltas(stack: Stack, adapter: Path) -> dict:
    """{base weight key: s * B @ A} from a saved adapter (fp32)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            b = tensors[stem + ".lora_B.weight"]
            module = stem[len("base_model.model."):]
            deltas[module + ".weight"] = scale * (b.float() @ a.float())
    return deltas


def build_all(work: Path, code_src: Path, rebuild: bool) -> dict:
    """Every artefact the cases use; reused when the manifest says they were built by this stack and script."""
    stack = Stack()
    manifest_path = work / "build.json"
    stamp = {"build_version": BUILD_VERSION, "stack": stack.versions(), "checkout": str(code_src),
             "code": {p.name: zlib.crc32(p.read_bytes()) for p in sorted(code_src.glob("*.py"))}}
    if manifest_path.is_file() and not rebuild:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("stamp") == stamp:
            say(f"reusing the artefacts in {work} (built by {stamp['stack']}; --rebuild to redo)")
            return manifest
    torch = stack.torch
    t0 = time.time()
    art = work / "artefacts"
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    layout_base = work / "layout" / LAYOUT_REL
    notes = {}

    say(f"building with {stack.versions()}")
    applied = build_base(stack, code_src, layout_base, scratch)
    for line in applied:
        say(f"  offline edit {line}")

    # the verbatim copy: code untouched, config + weights (+ tokenizer) added
    verbatim = work / "verbatim" / LAYOUT_REL
    if verbatim.exists():
        shutil.rmtree(verbatim)
    copy_code(code_src, verbatim, edit=False)
    shutil.copyfile(layout_base / "config.json", verbatim / "config.json")
    link_or_copy(weights_file(layout_base), verbatim / "model.safetensors")
    copy_tokenizer(code_src, verbatim)

    # a base whose config.json lacks attn_implementation (the code's default, flash_attention_2, applies)
    no_attn = art / "base_no_attn_impl"
    if no_attn.exists():
        shutil.rmtree(no_attn)
    no_attn.mkdir(parents=True)
    for path in layout_base.iterdir():
        if path.name == "model.safetensors":
            link_or_copy(path, no_attn / path.name)
        elif path.is_file():
            shutil.copyfile(path, no_attn / path.name)
    cfg = json.loads((layout_base / "config.json").read_text())
    cfg.pop("attn_implementation", None)
    (no_attn / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    adapters = art / "adapters"
    say("training adapters (official recipe)")
    notes["good"] = train_adapter(stack, layout_base, adapters / "good", targets=TARGETS, steps=6)
    notes["lora_on_plora"] = train_adapter(stack, layout_base, adapters / "lora_on_plora",
                                           targets=["Plora_A", "Plora_B"], steps=6)
    notes["llama_names"] = train_adapter(stack, layout_base, adapters / "llama_names",
                                         targets=["q_proj", "v_proj"], steps=6)
    notes["untrained"] = train_adapter(stack, layout_base, adapters / "untrained", targets=TARGETS, steps=0)
    for key, note in notes.items():
        say(f"  adapter {key}: {note}")

    from safetensors.torch import load_file, save_file

    good = adapters / "good"
    # ZeRO-3 style: every tensor saved as an empty placeholder of shape (0,)
    empty = adapters / "empty_tensors"
    if empty.exists():
        shutil.rmtree(empty)
    shutil.copytree(good, empty, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    good_tensors = load_file(str(good / "adapter_model.safetensors"))
    save_file({k: torch.empty(0, dtype=v.dtype) for k, v in good_tensors.items()},
              str(empty / "adapter_model.safetensors"), metadata={"format": "pt"})
    # the seed report's adapter: the same adapter as adapter_model.bin (what save_pretrained(safe_serialization=False)
    # writes: a plain dict of tensors), the file that was then fed to model.load_state_dict
    seed_bin = adapters / "seed_report_bin"
    if seed_bin.exists():
        shutil.rmtree(seed_bin)
    shutil.copytree(good, seed_bin, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    torch.save(dict(good_tensors), seed_bin / "adapter_model.bin")

    say("official merges (fp32, bf16)")
    merged = art / "merged"
    official_merge(stack, layout_base, good, merged / "fp32", torch.float32)
    official_merge(stack, layout_base, good, merged / "bf16", torch.bfloat16)

    say("the bf16 base as released, and its official bf16 merge")
    base_bf16 = art / "base_bf16"
    build_bf16_base(stack, layout_base, base_bf16)
    official_merge(stack, base_bf16, good, merged / "bf16_of_bf16", torch.bfloat16)

    say("broken merged checkpoints")
    deltas = adapter_deltas(stack, good)
    fp32_tensors = load_file(str(weights_file(layout_base)))
    bf16_tensors = load_file(str(weights_file(base_bf16)))
    base_tensors = fp32_tensors  # the base the variant being made was merged into
    last = TINY_CONFIG["num_hidden_layers"] - 1

    def twice(t):
        for key, delta in deltas.items():
            t[key] = (t[key].float() + delta).to(t[key].dtype)

    def folded(t):
        for key in deltas:
            stem = key[: -len(".weight")]
            plora = base_tensors[stem + ".Plora_B.weight"].float() @ base_tensors[stem + ".Plora_A.weight"].float()
            t[key] = (t[key].float() + plora * 1.0).to(t[key].dtype)  # PLoRA scaling = 256 / 256

    def plora_b_changed(t):
        key = "model.layers.0.attention.wqkv.Plora_B.weight"
        t[key] = t[key] * 1.5

    def plora_a_missing(t):
        for key in [k for k in t if k.endswith(".Plora_A.weight")]:
            del t[key]

    def layer_skipped(t):
        for key in deltas:
            if key.startswith(f"model.layers.{last}."):
                t[key] = base_tensors[key].clone()

    for name, fn in [("delta_twice", twice), ("plora_folded", folded), ("plora_b_changed", plora_b_changed),
                     ("plora_a_missing", plora_a_missing), ("layer_skipped", layer_skipped)]:
        variant_of(merged / "fp32", merged / name, fn)
    base_tensors = bf16_tensors  # the same breakages of the bf16 base's official bf16 merge
    for name, fn in [("delta_twice", twice), ("plora_folded", folded), ("layer_skipped", layer_skipped)]:
        variant_of(merged / "bf16_of_bf16", merged / f"bf16_{name}", fn)

    shutil.rmtree(scratch, ignore_errors=True)
    manifest = {"stamp": stamp, "edits": applied, "adapters": notes, "seconds": round(time.time() - t0, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"built in {manifest['seconds']} s")
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# cases


def cases(work: Path, url_line: int | None) -> list[dict]:
    art = work / "artefacts"
    ad, mg = art / "adapters", art / "merged"
    layout = work / "layout"
    base = layout / LAYOUT_REL
    bf16 = art / "base_bf16"
    any_extra = ["*"]
    url_text = f"ixc_utils.py:{url_line}" if url_line else "ixc_utils.py:"

    def case(name, adapter, *, base_model=base, merged=None, cwd=work, exit_code, fail=(), text=None, where=None,
             extra=(), dtype=None, note=""):
        return {"name": name, "adapter": str(adapter), "base_model": str(base_model),
                "merged": str(merged) if merged else None, "cwd": str(cwd), "exit": exit_code,
                "must_fail": list(fail), "text": text, "text_in": where, "allowed_extra": list(extra),
                "dtype": dtype, "note": note}

    return [
        case("good", ad / "good", exit_code=0),
        case("good+merged-fp32", ad / "good", merged=mg / "fp32", exit_code=0),
        case("good+merged-bf16", ad / "good", merged=mg / "bf16", exit_code=0),
        case("lora-on-plora", ad / "lora_on_plora", exit_code=1, fail=["lora-on-plora"], text="Plora_A",
             extra=any_extra),
        case("empty-tensors", ad / "empty_tensors", exit_code=1, fail=["empty-tensors"], text="empty",
             extra=any_extra),
        case("untrained", ad / "untrained", exit_code=1, fail=["noop"], text="zero", extra=["effect"]),
        case("llama-names", ad / "llama_names", exit_code=1, fail=["targets-resolve"], text="vision",
             extra=any_extra),
        case("merged-delta-twice", ad / "good", merged=mg / "delta_twice", exit_code=1, fail=["merged-matches"],
             text="differ from W"),
        case("merged-plora-folded", ad / "good", merged=mg / "plora_folded", exit_code=1, fail=["merged-matches"],
             text="PLoRA branch folded"),
        case("merged-plora-b-changed", ad / "good", merged=mg / "plora_b_changed", exit_code=1,
             fail=["merged-matches"], text="Plora_B"),
        case("merged-plora-a-missing", ad / "good", merged=mg / "plora_a_missing", exit_code=1,
             fail=["merged-matches"], text="Plora_A"),
        case("merged-layer-skipped", ad / "good", merged=mg / "layer_skipped", exit_code=1,
             fail=["merged-matches"], text="not merged"),
        case("seed-report-bin", ad / "seed_report_bin", exit_code=0,
             text="this is a PEFT adapter, not a model state dict", where=["key-coverage", "path-agreement"]),
        case("relative-base", ad / "good", base_model=LAYOUT_REL, cwd=layout, exit_code=0,
             note="same dir as 'good', given relative from its parent"),
        case("relative-base+merged-fp32", ad / "good", base_model=LAYOUT_REL, merged=mg / "fp32", cwd=layout,
             exit_code=0),
        case("no-attn-impl-config", ad / "good", base_model=art / "base_no_attn_impl", exit_code=0),
        case("verbatim-base", ad / "good", base_model=work / "verbatim" / LAYOUT_REL, exit_code=2, text=url_text,
             where=["stderr-one-line"]),
        # the base as released: bf16 on disk, the harness's default dtype (the checkpoint's: bfloat16)
        case("bf16-base", ad / "good", base_model=bf16, exit_code=0, dtype="bfloat16"),
        case("bf16-base+merged-bf16", ad / "good", base_model=bf16, merged=mg / "bf16_of_bf16", exit_code=0,
             dtype="bfloat16", note="the official merge in bf16 of the bf16 base"),
        case("bf16-base-untrained", ad / "untrained", base_model=bf16, exit_code=1, fail=["noop"], text="zero",
             extra=["effect"]),
        case("bf16-base-merged-delta-twice", ad / "good", base_model=bf16, merged=mg / "bf16_delta_twice",
             exit_code=1, fail=["merged-matches"], text="differ from W"),
        case("bf16-base-merged-plora-folded", ad / "good", base_model=bf16, merged=mg / "bf16_plora_folded",
             exit_code=1, fail=["merged-matches"], text="PLoRA branch folded"),
        case("bf16-base-merged-layer-skipped", ad / "good", base_model=bf16, merged=mg / "bf16_layer_skipped",
             exit_code=1, fail=["merged-matches"], text="not merged"),
    ]


def describe_expected(c: dict) -> str:
    parts = [f"exit {c['exit']}"]
    if c["must_fail"]:
        parts.append("fail " + ",".join(c["must_fail"]) + (" (+any)" if "*" in c["allowed_extra"] else
                                                             (" (+" + ",".join(c["allowed_extra"]) + ")"
                                                              if c["allowed_extra"] else "")))
    elif c["exit"] == 0:
        parts.append("no failure")
    if c["text"]:
        parts.append(f"'{c['text']}'" + (f" in {'/'.join(c['text_in'])}" if c["text_in"] else ""))
    if c.get("dtype"):
        parts.append(f"dynamic checks in {c['dtype']} (default dtype)")
    return "; ".join(parts)


def harness_has_flag(python: str, flag: str, env: dict) -> bool:
    out = subprocess.run([python, "-m", "harness.cli", "check", "--help"], capture_output=True, text=True, env=env,
                         timeout=300)
    return flag in out.stdout


def run_case(c: dict, python: str, work: Path, env_base: dict, timeout: int, trust_flag: bool) -> dict:
    cdir = work / "cases" / c["name"]
    if cdir.exists():
        shutil.rmtree(cdir)
    (cdir / "tmp").mkdir(parents=True)
    json_path = cdir / "report.json"
    cmd = [python, "-m", "harness.cli", "check", "--adapter", c["adapter"], "--base-model", c["base_model"]]
    if c["merged"]:
        cmd += ["--merged", c["merged"]]
    cmd += ["--json", str(json_path), "--quiet"]
    if trust_flag:
        cmd.append("--trust-remote-code")
    env = dict(env_base, HF_MODULES_CACHE=str(cdir / "hf_modules"), TMPDIR=str(cdir / "tmp"))
    (cdir / "command.txt").write_text(f"cd {c['cwd']} && " + " ".join(cmd) + "\n")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=c["cwd"], capture_output=True, text=True, env=env, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout, stderr = "timeout", str(err.stdout or ""), str(err.stderr or "")
    got = {"exit": rc, "seconds": round(time.time() - t0, 1), "failed": [], "warned": [], "first_fail": None,
           "dtypes": [],
           "stderr_lines": [line for line in stderr.splitlines() if line.strip()]}
    (cdir / "stdout.txt").write_text(stdout)
    (cdir / "stderr.txt").write_text(stderr)
    shutil.rmtree(cdir / "tmp", ignore_errors=True)
    shutil.rmtree(cdir / "hf_modules", ignore_errors=True)
    report = None
    if json_path.is_file():
        try:
            report = json.loads(json_path.read_text())
        except ValueError as err:
            got["json_error"] = str(err)
    if report:
        for chk in report.get("checks", []):
            if chk.get("status") == "fail":
                got["failed"].append(chk["id"])
                if got["first_fail"] is None:
                    got["first_fail"] = f"{chk['id']}: {chk.get('message', '')}"
            elif chk.get("status") == "warn":
                got["warned"].append(chk["id"])
            dtype = (chk.get("details") or {}).get("dtype") if isinstance(chk.get("details"), dict) else None
            if dtype and chk.get("status") in ("pass", "fail", "warn") and dtype not in got["dtypes"]:
                got["dtypes"].append(dtype)
    return judge(c, got, report)


def judge(c: dict, got: dict, report: dict | None) -> dict:
    why = []
    if got["exit"] != c["exit"]:
        why.append(f"exit {got['exit']} != {c['exit']}")
    missing = [i for i in c["must_fail"] if i not in got["failed"]]
    if missing:
        why.append(f"did not fail: {','.join(missing)}")
    if c.get("dtype") and got["dtypes"] != [c["dtype"]]:
        why.append(f"dynamic checks ran in {got['dtypes'] or 'no recorded dtype'}, not {c['dtype']}")
    if "*" not in c["allowed_extra"]:
        extra = [i for i in got["failed"] if i not in c["must_fail"] and i not in c["allowed_extra"]]
        if extra:
            why.append(f"unexpected failures: {','.join(extra)}")
    if c["text"]:
        where = c["text_in"]
        if where == ["stderr-one-line"]:
            lines = got["stderr_lines"]
            if len(lines) != 1:
                why.append(f"{len(lines)} stderr lines, not 1")
            if not any(c["text"] in line for line in lines):
                why.append(f"'{c['text']}' not on stderr")
        else:
            found = False
            for chk in (report or {}).get("checks", []):
                if where and chk["id"] not in where:
                    continue
                if not where and chk["id"] not in c["must_fail"]:
                    continue
                blob = chk.get("message", "") + " " + json.dumps(chk.get("details"), ensure_ascii=False)
                if c["text"] in (chk.get("message", "") if not where else blob):
                    found = True
            if not found:
                why.append(f"'{c['text']}' not in {'/'.join(where) if where else 'the failing message'}")
    return {"case": c["name"], "expected": describe_expected(c), "got": got, "right": not why, "why_wrong": why,
            "note": c["note"]}


def shorten(text: str | None, n: int = 140) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def got_text(r: dict) -> str:
    g = r["got"]
    parts = [f"exit {g['exit']}"]
    if g["failed"]:
        parts.append("failed " + ",".join(g["failed"]))
    if g.get("dtypes"):
        parts.append("dynamic in " + ",".join(g["dtypes"]))
    if g["first_fail"]:
        parts.append(shorten(g["first_fail"]))
    elif g["exit"] not in (0, 1) and g["stderr_lines"]:
        parts.append(f"stderr[{len(g['stderr_lines'])} lines]: " + shorten(g["stderr_lines"][-1]))
    return "; ".join(parts)


def stack_of(python: str, env: dict) -> str:
    code = ("import sys, torch, transformers, peft\n"
            "try:\n import torchvision; tv = torchvision.__version__\nexcept Exception as e: tv = 'unimportable'\n"
            "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {tv}, '"
            "f'transformers {transformers.__version__}, peft {peft.__version__}')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    return out.stdout.strip() or f"(could not import: {shorten(out.stderr, 200)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xcomposer", type=Path, required=True, help="checkout of InternLM/InternLM-XComposer")
    parser.add_argument("--work", type=Path, required=True, help="all outputs go here")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose harness is under test")
    parser.add_argument("--stack-label", default="", help="free text printed with the stack")
    parser.add_argument("--json-out", type=Path, help="write the results table as JSON here")
    parser.add_argument("--cases", default="", help="comma-separated subset of case names")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case (default 900)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild every artefact")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    checkout = args.xcomposer.resolve()
    if work == checkout or checkout in work.parents:
        sys.exit("real_xcomposer_fidelity: --work must not be inside the checkout")
    work.mkdir(parents=True, exist_ok=True)
    code_src = find_code_dir(checkout)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PLORA_HARNESS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf_home"),
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ.update({k: v for k, v in env.items() if k.startswith(("HF_", "TRANSFORMERS_"))})
    os.environ["HF_MODULES_CACHE"] = str(work / "hf_modules_build")  # before transformers is imported

    say(f"checkout: {code_src}")
    manifest = build_all(work, code_src, args.rebuild)
    url_line = urlopen_line(code_src)
    all_cases = cases(work, url_line)
    if args.cases:
        wanted = {n.strip() for n in args.cases.split(",") if n.strip()}
        unknown = wanted - {c["name"] for c in all_cases}
        if unknown:
            sys.exit(f"unknown case(s) {sorted(unknown)}; known: {[c['name'] for c in all_cases]}")
        all_cases = [c for c in all_cases if c["name"] in wanted]

    trust_flag = harness_has_flag(args.python, "--trust-remote-code", env)
    stack = stack_of(args.python, env)
    say(f"harness under test: {args.python} -m harness.cli (--trust-remote-code {'passed' if trust_flag else 'not listed'})")
    results = []
    for c in all_cases:
        say(f"... {c['name']}")
        r = run_case(c, args.python, work, env, args.timeout, trust_flag)
        say(f"    {'RIGHT' if r['right'] else 'WRONG'} in {r['got']['seconds']} s: {got_text(r)}")
        results.append(r)

    say("")
    say(f"stack: {stack}" + (f"  [{args.stack_label}]" if args.stack_label else ""))
    say("offline edits: " + ("; ".join(e.split(" (why")[0] for e in manifest.get("edits", [])) or "none"))
    header = ("case", "expected", "got", "verdict")
    rows = [(r["case"], r["expected"], got_text(r), "RIGHT" if r["right"] else "WRONG: " + "; ".join(r["why_wrong"]))
            for r in results]
    widths = [max(len(header[0]), *(len(x[0]) for x in rows))]
    say(f"{header[0]:<{widths[0]}} | expected | got | verdict")
    for row in rows:
        say(f"{row[0]:<{widths[0]}} | {row[1]} | {row[2]} | {row[3]}")
    right = sum(r["right"] for r in results)
    say(f"{right} of {len(results)} verdicts right")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"stack": stack, "stack_label": args.stack_label,
                                             "python": args.python, "trust_remote_code_flag": trust_flag,
                                             "edits": manifest.get("edits", []), "adapters": manifest.get("adapters"),
                                             "results": results}, indent=2) + "\n")
    return 0 if right == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
