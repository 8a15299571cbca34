"""PLoRA, the CLIP-like vision tower and the projector (remote code: torch/transformers only).

Mirrors the real ``build_mlp.py`` of InternLM-XComposer2: ``PLoRA`` is an
``nn.Linear`` subclass whose own low-rank branch ``Plora_B(Plora_A(x))`` is added
on image rows only (``im_mask`` True), so PEFT wraps it like any Linear and passes
``im_mask`` through to it.
"""

import urllib.request

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class PLoRA(nn.Linear):
    """Linear + partial low-rank branch applied only where ``im_mask`` is True.

    ``flatten_form`` selects the IXC2-4KHD/2.5 forward (flatten batch and
    sequence, then reshape back) instead of the IXC2 3-D masked add; the two are
    numerically the same, but the flattened one is what HD checkpoints run.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_len: int = 0,
        flatten_form: bool = False,
        legacy_none_mask_crash: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_len = lora_len  # stored, never used (as in the real code)
        self.lora_scaling = lora_alpha / lora_r
        self.flatten_form = flatten_form
        self.legacy_none_mask_crash = legacy_none_mask_crash
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False, device=device, dtype=dtype)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.Plora_B(self.Plora_A(self.lora_dropout(x))) * self.lora_scaling

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.flatten_form:
            return self._forward_flat(x, im_mask)
        res = super().forward(x)
        if im_mask is not None and bool(im_mask.any()):
            res[im_mask] += self._branch(x[im_mask])
        else:
            # Zero-weighted dummy term keeps the branch in the autograd graph.
            res[:, :1] += self._branch(x[:, :1]) * 0
        return res

    def _forward_flat(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        if self.legacy_none_mask_crash:
            im_mask = im_mask.view(-1)  # the old HD code: crashes when im_mask is None
        shape = x.shape
        res = super().forward(x).reshape(-1, self.out_features)
        flat_x = x.reshape(-1, self.in_features)
        if im_mask is not None and bool(im_mask.any()):
            flat_mask = im_mask.reshape(-1)
            res[flat_mask] += self._branch(flat_x[flat_mask])
        else:
            res[:1] += self._branch(flat_x[:1]) * 0
        return res.reshape(*shape[:-1], self.out_features)


def get_asset(url: str) -> bytes:
    """What the real ``ixc_utils.get_font()`` does in ``__init__``: read a file over the network."""
    return urllib.request.urlopen(url, timeout=10).read()


class CLIPVisionTower(nn.Module):
    """The ``vit`` wrapper: a CLIPVisionModel built from a config, or (quirk ``relative-vision-tower``, as the
    real code does) loaded with ``from_pretrained`` from a path relative to the current directory."""

    def __init__(self, vision_config: dict, select_layer: int = -1, pretrained_path: str | None = None) -> None:
        super().__init__()
        self.select_layer = select_layer
        if pretrained_path is not None:
            clip = CLIPVisionModel.from_pretrained(pretrained_path)
        else:
            clip = CLIPVisionModel(CLIPVisionConfig(**vision_config))
        if hasattr(clip, "vision_model"):  # transformers 4.x: keys vision_tower.vision_model.*, as in real checkpoints
            self.vision_tower = clip
        else:  # transformers 5 flattened CLIPVisionModel; keep the real checkpoints' vision_model level
            self.vision_tower = nn.Module()
            self.vision_tower.vision_model = clip

    @property
    def _clip(self) -> nn.Module:
        return self.vision_tower if isinstance(self.vision_tower, CLIPVisionModel) else self.vision_tower.vision_model

    @property
    def hidden_size(self) -> int:
        return self._clip.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self._clip(pixel_values, output_hidden_states=True)
        # Last layer, patch tokens only (drop the CLS token), as the real wrapper does.
        return out.hidden_states[self.select_layer][:, 1:]


def build_vision_projector(in_dim: int, hidden: int) -> nn.Sequential:
    """``vision_proj`` = Linear, GELU, Linear (keys ``vision_proj.0.*``, ``vision_proj.2.*``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
