"""The synthetic family has the real names, shapes and semantics (names, shapes, forward forms of IXC2/4KHD/2.5)."""

import math

import pytest
import torch

from harness.model.families.xcomposer import MASK_KWARG
from harness.numerics.probes import make_probe
from harness.synthetic import FULL_7B, TINY, build_model, make_config

VARIANTS = ["ixc2", "ixc2-4khd", "ixc2.5"]
LINEARS = {"attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}


def expected_shapes(variant, d):
    head_dim = d.hidden_size // d.num_attention_heads
    qkv = (d.num_attention_heads + 2 * d.num_key_value_heads) * head_dim
    scale = d.hidden_size / 4096
    big = min(256, max(2, round(256 * scale)))
    qkv_r = min(8, max(2, round(8 * scale))) if variant == "ixc2-4khd" else big
    io = {"attention.wqkv": (d.hidden_size, qkv, qkv_r), "attention.wo": (d.hidden_size, d.hidden_size, big),
          "feed_forward.w1": (d.hidden_size, d.intermediate_size, big),
          "feed_forward.w3": (d.hidden_size, d.intermediate_size, big),
          "feed_forward.w2": (d.intermediate_size, d.hidden_size, big)}
    shapes = {"model.tok_embeddings.weight": (d.vocab_size, d.hidden_size), "model.norm.weight": (d.hidden_size,),
              "output.weight": (d.vocab_size, d.hidden_size)}
    for i in range(d.num_hidden_layers):
        for name, (fan_in, fan_out, r) in io.items():
            p = f"model.layers.{i}.{name}"
            shapes[f"{p}.weight"] = (fan_out, fan_in)
            shapes[f"{p}.Plora_A.weight"] = (r, fan_in)
            shapes[f"{p}.Plora_B.weight"] = (fan_out, r)
        shapes[f"model.layers.{i}.attention_norm.weight"] = (d.hidden_size,)
        shapes[f"model.layers.{i}.ffn_norm.weight"] = (d.hidden_size,)
    proj_in = d.vision_hidden_size * (4 if variant != "ixc2" else 1)
    shapes["vision_proj.0.weight"] = (d.hidden_size, proj_in)
    shapes["vision_proj.2.weight"] = (d.hidden_size, d.hidden_size)
    if variant != "ixc2":
        shapes["plora_glb_GN"] = (1, 1, d.hidden_size)
        shapes["plora_sub_GN"] = (1, 1, 1, d.hidden_size)
    return shapes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dims", [TINY, FULL_7B], ids=["tiny", "7b-meta"])
def test_language_model_keys_and_shapes(variant, dims):
    device = "meta" if dims is FULL_7B else "cpu"
    state = {k: tuple(v.shape) for k, v in build_model(variant, dims, device=device).state_dict().items()}
    want = expected_shapes(variant, dims)
    assert {k: state.get(k) for k in want} == want
    lm_keys = {k for k in state if k.startswith("model.") or k == "output.weight"}
    assert lm_keys <= set(want), sorted(lm_keys - set(want))  # nothing extra in the LM (no biases)
    assert not any("GN" in k for k in state) or variant != "ixc2"
    assert any(k.startswith("vit.vision_tower.") for k in state)


def test_real_7b_numbers():
    shapes = expected_shapes("ixc2.5", FULL_7B)
    assert shapes["model.layers.0.attention.wqkv.weight"] == (6144, 4096)
    assert shapes["model.layers.0.feed_forward.w2.Plora_A.weight"] == (256, 14336)
    cfg = make_config("ixc2-4khd", FULL_7B)
    assert (cfg.plora_r["wqkv"], cfg.plora_alpha["wqkv"]) == (8, 16)
    assert (cfg.plora_r["wo"], cfg.plora_alpha["wo"]) == (256, 256)
    model = build_model("ixc2-4khd", FULL_7B, device="meta")
    assert model.vision_proj[0].weight.shape == (4096, 4096)  # 2x2-merged CLIP features on HD
    assert sum(p.numel() for p in model.model.parameters()) > 7e9


def test_wqkv_packs_gqa_per_kv_group():
    """wqkv rows are [n_kv][gs + 2][head_dim]: gs query heads, one K head, one V head per group."""
    model = build_model("ixc2", TINY.with_(num_attention_heads=4, num_key_value_heads=2))
    attn = model.model.layers[0].attention
    n_kv, gs, hd = attn.num_key_value_heads, attn.num_key_value_groups, attn.head_dim
    w = attn.wqkv.weight.view(n_kv, gs + 2, hd, -1)
    wq, wk, wv = w[:, :gs].reshape(-1, w.shape[-1]), w[:, gs].reshape(-1, w.shape[-1]), w[:, gs + 1].reshape(-1, w.shape[-1])
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    from harness.synthetic.modeling.modeling_internlm2 import apply_rotary, causal_attention_bias, rotary_cos_sin

    q = (x @ wq.T).view(1, 5, n_kv * gs, hd).transpose(1, 2)
    k = (x @ wk.T).view(1, 5, n_kv, hd).transpose(1, 2)
    v = (x @ wv.T).view(1, 5, n_kv, hd).transpose(1, 2)
    cos, sin = rotary_cos_sin(pos, hd, model.config.rope_theta, torch.float32)
    q, k = apply_rotary(q, k, cos, sin)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(1, 5, -1) @ attn.wo.weight.T
    bias = causal_attention_bias(None, 5, 0, torch.float32, x.device)
    with torch.no_grad():
        got = attn(x, bias, pos, None, torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rmsnorm_computes_in_fp32():
    from harness.synthetic.modeling.modeling_internlm2 import InternLM2RMSNorm

    norm = InternLM2RMSNorm(8, eps=1e-5).to(torch.bfloat16)
    x = (torch.randn(2, 8) * 300).to(torch.bfloat16)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x).float(), ref.to(torch.bfloat16).float())


@pytest.mark.parametrize("variant", VARIANTS)
def test_plora_acts_on_image_rows_through_the_whole_model(variant):
    model = build_model(variant)
    probe = make_probe(model.get_input_embeddings(), seq_len=10, image_spans=[(6, 9)])
    with torch.no_grad():
        base = model(**probe.model_kwargs(MASK_KWARG)).logits
        for name, param in model.named_parameters():
            if "Plora_B" in name:
                param.mul_(3.0)
        changed = model(**probe.model_kwargs(MASK_KWARG)).logits
    # causal: rows before the first image row cannot see PLoRA at all
    torch.testing.assert_close(changed[:, :6], base[:, :6], rtol=0, atol=0)
    assert (changed[:, 6:] - base[:, 6:]).abs().max() > 1e-3


def test_input_ids_path_means_text_only():
    """Embedding input_ids inside the model forces an all-False im_mask (PLoRA off)."""
    model = build_model("ixc2.5")
    ids = torch.randint(4, 128, (1, 6))
    emb = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = model(input_ids=ids, im_mask=torch.ones(1, 6, dtype=torch.bool)).logits
        text_only = model(inputs_embeds=emb, im_mask=torch.zeros(1, 6, dtype=torch.bool)).logits
    torch.testing.assert_close(from_ids, text_only, rtol=0, atol=0)


def test_float_im_mask_is_refused():
    model = build_model("ixc2")
    emb = model.get_input_embeddings()(torch.randint(4, 128, (1, 4)))
    with pytest.raises(TypeError, match="bool"):
        model(inputs_embeds=emb, im_mask=torch.ones(1, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_img_rows(variant):
    model = build_model(variant)
    rows = model.encode_img(torch.randn(2, 3, 28, 28))
    # 28/7 = 4x4 patches: IXC2 keeps 16 rows; HD merges 2x2 → 2x2 grid + sub_GN per row + glb_GN.
    assert rows.shape == ((2, 16, 64) if variant == "ixc2" else (2, 2 * 3 + 1, 64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_with_cache_matches_full_recompute(variant):
    model = build_model(variant)
    probe = make_probe(model.get_input_embeddings(), seq_len=9, left_padding=[0, 2])
    out = model.generate(**probe.model_kwargs(MASK_KWARG), max_new_tokens=4, do_sample=False, pad_token_id=0)
    embeds, mask, attn = probe.inputs_embeds, probe.im_mask, probe.attention_mask
    tokens = []
    with torch.no_grad():
        for _ in range(4):
            nxt = model(inputs_embeds=embeds, im_mask=mask, attention_mask=attn, use_cache=False).logits[:, -1].argmax(-1)
            tokens.append(nxt)
            embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.zeros(2, 1, dtype=torch.bool)], 1)
            attn = torch.cat([attn, torch.ones(2, 1, dtype=torch.long)], 1)
    assert out[:, -4:].tolist() == torch.stack(tokens, 1).tolist()


def test_build_is_deterministic_and_seeded():
    a, b, c = build_model("ixc2"), build_model("ixc2"), build_model("ixc2", seed=1)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.output.weight, c.output.weight)


def test_activations_stay_sane_at_small_scale():
    model = build_model("ixc2.5")
    probe = make_probe(model.get_input_embeddings())
    with torch.no_grad():
        logits = model(**probe.model_kwargs(MASK_KWARG)).logits
    assert torch.isfinite(logits).all()
    assert 0.1 < logits.std().item() < 10 and not math.isnan(logits.std().item())
