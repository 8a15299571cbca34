"""Configuration of the synthetic InternLM-XComposer2 family.

This file is exported beside the weights as remote code, so it may import only
``transformers`` (never ``harness``): a model directory written by the harness
must load in a process that has nothing but torch and transformers.
"""

from transformers import PretrainedConfig

VARIANTS = ("ixc2", "ixc2-4khd", "ixc2.5")
PLORA_MODULES = ("wqkv", "wo", "w1", "w2", "w3")
# The real remote code's behaviours that trip a harness, each reproducible on its own (all off by default):
#   flash-default          attn_implementation defaults to flash_attention_2, and None becomes it (as the real
#                          config class does), and the flash path needs the flash_attn package
#   im-mask-kwargs         the top-level forward takes im_mask only through **kwargs
#   relative-vision-tower  __init__ loads the CLIP tower with from_pretrained(<path relative to the CWD>)
#   url-fetch              __init__ reads a file with urllib's urlopen (the real get_font() fetches SimHei.ttf)
#   rotary-buffers         RoPE tables kept as non-persistent buffers (transformers 5 leaves them uninitialised)
QUIRKS = ("flash-default", "im-mask-kwargs", "relative-vision-tower", "url-fetch", "rotary-buffers")


class InternLMXcomposer2Config(PretrainedConfig):
    """InternLM2 decoder + CLIP-like vision tower + PLoRA ranks per module.

    ``variant`` selects the forward form of PLoRA (``ixc2``: 3-D masked add;
    ``ixc2-4khd``/``ixc2.5``: flattened) and whether the HD separators
    ``plora_glb_GN``/``plora_sub_GN`` exist.
    """

    model_type = "internlmxcomposer2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 224,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        hidden_act: str = "silu",
        max_position_embeddings: int = 512,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1_000_000.0,
        bias: bool = False,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        variant: str = "ixc2",
        plora_r: dict | None = None,
        plora_alpha: dict | None = None,
        plora_dropout: float = 0.05,
        vision_config: dict | None = None,
        legacy_none_mask_crash: bool = False,
        quirks: list | None = None,
        attn_implementation: str | None = None,
        vision_tower_path: str = "clip-vision-tower",
        asset_url: str = "https://example.invalid/SimHei.ttf",
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.bias = bias
        self.use_cache = use_cache
        self.variant = variant
        self.plora_r = dict(plora_r or {m: 4 for m in PLORA_MODULES})
        self.plora_alpha = dict(plora_alpha or dict(self.plora_r))
        self.plora_dropout = plora_dropout
        self.vision_config = dict(vision_config or {})
        # Reproduces the old HD-form bug where ``im_mask=None`` crashes (tests only).
        self.legacy_none_mask_crash = legacy_none_mask_crash
        self.quirks = list(quirks or [])
        unknown = sorted(set(self.quirks) - set(QUIRKS))
        if unknown:
            raise ValueError(f"unknown quirks {unknown}; choose from {QUIRKS}")
        if "flash-default" in self.quirks and attn_implementation is None:
            attn_implementation = "flash_attention_2"  # the real config class: None means flash attention
        self.attn_implementation = attn_implementation or "eager"
        self.vision_tower_path = vision_tower_path
        self.asset_url = asset_url
        kwargs.setdefault("architectures", ["InternLMXComposer2ForCausalLM"])
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def hd(self) -> bool:
        """HD variants carry the GN separators and the flattened PLoRA form."""
        return self.variant != "ixc2"
