"""The InternLM2 decoder with PLoRA linears (remote code: torch/transformers only).

Real names and semantics: ``tok_embeddings``, ``layers.{i}.attention.wqkv`` packing
Q/K/V per KV group as ``[n_kv][gs + 2][head_dim]``, ``attention.wo``,
``feed_forward.w1/w2/w3`` (SwiGLU), ``attention_norm``/``ffn_norm`` (RMSNorm in
fp32), Llama RoPE, causal eager attention, final ``norm``. No biases.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .build_mlp import PLoRA


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Llama RoPE tables computed on the fly: no buffers that a reload could leave uninitialised."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryBuffers(nn.Module):
    """Quirk ``rotary-buffers``: RoPE tables precomputed into non-persistent buffers, as the real code keeps
    ``inv_freq``/``cos_cached``/``sin_cached``; transformers 5 leaves such buffers uninitialised on load."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        emb = torch.cat([torch.outer(torch.arange(max_positions).float(), inv_freq)] * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return self.cos_cached[position_ids].to(dtype), self.sin_cached[position_ids].to(dtype)


def _import_flash_attn():
    """As the real code: the flash attention path imports flash_attn when it runs."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise ImportError("flash_attn is not installed.") from None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _plora(config, in_f: int, out_f: int, name: str) -> PLoRA:
    return PLoRA(
        in_f,
        out_f,
        bias=config.bias,
        lora_r=config.plora_r[name],
        lora_alpha=config.plora_alpha[name],
        lora_dropout=config.plora_dropout,
        flatten_form=config.hd,
        legacy_none_mask_crash=config.legacy_none_mask_crash,
    )


class InternLM2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = _plora(config, h, i, "w1")
        self.w3 = _plora(config, h, i, "w3")
        self.w2 = _plora(config, i, h, "w2")
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2Attention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.rope_theta = config.rope_theta
        qkv_out = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.wqkv = _plora(config, config.hidden_size, qkv_out, "wqkv")
        self.wo = _plora(config, self.num_heads * self.head_dim, config.hidden_size, "wo")
        quirks = getattr(config, "quirks", [])
        self.attn_implementation = getattr(config, "attn_implementation", "eager")
        self.rotary = (RotaryBuffers(self.head_dim, self.rope_theta, config.max_position_embeddings)
                       if "rotary-buffers" in quirks else None)

    def forward(self, hidden_states, attention_bias, position_ids, past_key_value, im_mask):
        if self.attn_implementation == "flash_attention_2":
            _import_flash_attn()
        bsz, q_len, _ = hidden_states.shape
        gs = self.num_key_value_groups
        qkv = self.wqkv(hidden_states, im_mask)
        qkv = qkv.view(bsz, q_len, self.num_key_value_heads, gs + 2, self.head_dim)
        q = qkv[..., :gs, :].reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids, q.dtype)
        else:
            cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)
        k = k.repeat_interleave(gs, dim=1)
        v = v.repeat_interleave(gs, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores + attention_bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.wo(out, im_mask)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_bias, position_ids, past_key_value, im_mask):
        residual = hidden_states
        h = self.attention(self.attention_norm(hidden_states), attention_bias, position_ids, past_key_value, im_mask)
        hidden_states = residual + h
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states), im_mask)


def causal_attention_bias(attention_mask, q_len: int, past_len: int, dtype, device) -> torch.Tensor:
    """Additive [B, 1, q, kv] bias: causal, plus padding from a 2-D attention mask."""
    kv_len = past_len + q_len
    min_value = torch.finfo(dtype).min
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), min_value, dtype=dtype, device=device))


class InternLM2Model(nn.Module):
    """The decoder stack (``model.*`` keys of the checkpoint)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids=None, inputs_embeds=None, im_mask=None, attention_mask=None,
                position_ids=None, past_key_values=None):
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
            # As in the real model: text embedded here is never image rows, so PLoRA
            # acts in prefill (inputs_embeds) only, never on decode steps.
            im_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if im_mask is not None and im_mask.dtype != torch.bool:
            raise TypeError(f"im_mask must be a bool tensor, got {im_mask.dtype}")
        bsz, q_len, _ = inputs_embeds.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
                position_ids = position_ids.unsqueeze(0).expand(bsz, -1)
        bias = causal_attention_bias(attention_mask, q_len, past_len, inputs_embeds.dtype, inputs_embeds.device)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, bias, position_ids, past_key_values, im_mask)
        return self.norm(hidden_states)
