"""InternLMXComposer2ForCausalLM, synthetic and tiny (remote code: torch/transformers only).

Language model ``model`` (InternLM2 with PLoRA), LM head ``output``, vision tower
``vit``, projector ``vision_proj`` and, on HD variants, the separators
``plora_glb_GN`` ``[1, 1, H]`` and ``plora_sub_GN`` ``[1, 1, 1, H]``. The forward
takes ``input_ids`` or ``inputs_embeds`` plus an ``im_mask`` keyword, like the real one.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 4.36
    from transformers import DynamicCache

    _LEGACY_GENERATE = False
except ImportError:  # the XComposer-era stack (transformers 4.33): no Cache classes, no generic generate prep
    _LEGACY_GENERATE = True

    class DynamicCache:  # noqa: D101 - the two methods the decoder uses, as in transformers' DynamicCache
        def __init__(self) -> None:
            self.key_cache: list[torch.Tensor] = []
            self.value_cache: list[torch.Tensor] = []

        def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
            if len(self.key_cache) <= layer_idx:
                self.key_cache.append(key)
                self.value_cache.append(value)
            else:
                self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
                self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
            return self.key_cache[layer_idx], self.value_cache[layer_idx]

        def get_seq_length(self) -> int:
            return self.key_cache[0].shape[-2] if self.key_cache else 0

from .build_mlp import CLIPVisionTower, build_vision_projector, get_asset
from .configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from .modeling_internlm2 import InternLM2Model

# transformers 5.x renamed the output/keyword ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLMXcomposer2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class InternLMXComposer2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        quirks = getattr(config, "quirks", [])
        if "url-fetch" in quirks:
            self.asset = get_asset(config.asset_url)
        relative = config.vision_tower_path if "relative-vision-tower" in quirks else None
        self.vit = CLIPVisionTower(config.vision_config, pretrained_path=relative)
        vit_dim = self.vit.hidden_size * (4 if config.hd else 1)  # HD merges 2x2 patches
        self.vision_proj = build_vision_projector(vit_dim, config.hidden_size)
        if config.hd:
            self.plora_glb_GN = nn.Parameter(torch.zeros([1, 1, config.hidden_size]))
            self.plora_sub_GN = nn.Parameter(torch.zeros([1, 1, 1, config.hidden_size]))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.output = value

    def encode_img(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image → rows of language-model embeddings (HD: 2x2 merge, sub/glb separators)."""
        feats = self.vit(pixel_values)  # [B, P, C]
        if not self.config.hd:
            return self.vision_proj(feats)
        b, p, c = feats.shape
        side = int(p**0.5)
        grid = feats.view(b, side, side, c)[:, : side // 2 * 2, : side // 2 * 2]
        grid = grid.reshape(b, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        grid = self.vision_proj(grid.reshape(b, side // 2, side // 2, 4 * c))  # [B, h, w, H]
        rows = torch.cat([grid, self.plora_sub_GN.expand(b, side // 2, 1, -1)], dim=2)
        rows = rows.reshape(b, -1, self.config.hidden_size)
        return torch.cat([self.plora_glb_GN.expand(b, 1, -1), rows], dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        im_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        past_key_values = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            im_mask=im_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if use_cache else None,
        )
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, self.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        cache = {_CACHE_FIELD: past_key_values if use_cache else None}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache)

    if _LEGACY_GENERATE:
        # transformers 4.33's generate() needs the model's own input preparation (as the real remote code has).
        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                          inputs_embeds=None, im_mask=None, **kwargs):
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            if past > 0:
                # input_ids holds only generated tokens when the prompt came as inputs_embeds: keep the new ones.
                keep = input_ids.shape[1] - past if input_ids.shape[1] > past else 1
                input_ids = input_ids[:, -keep:]
                inputs_embeds, im_mask = None, None
            if inputs_embeds is not None:
                model_inputs = {"inputs_embeds": inputs_embeds, "im_mask": im_mask}
            else:
                model_inputs = {"input_ids": input_ids}
            model_inputs.update(past_key_values=past_key_values, attention_mask=attention_mask,
                                use_cache=kwargs.get("use_cache"))
            return model_inputs


class InternLMXComposer2KwargsForCausalLM(InternLMXComposer2ForCausalLM):
    """Quirk ``im-mask-kwargs``: the real code's top-level forward, which reads im_mask from ``**kwargs``."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, **kwargs):
        im_mask = kwargs.pop("im_mask", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, im_mask=im_mask, return_dict=return_dict, **kwargs)
