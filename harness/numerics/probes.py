"""Deterministic probe batches: text rows, image rows and padding, for any causal LM.

Image rows are deterministic random vectors scaled to the RMS of the model's own
token embeddings, so the probe needs no vision tower and works on models the
harness has never seen; a model family's mask keyword marks them (``mask_kwarg``: XComposer's ``im_mask``).

How a probe reaches the model (``feed``) decides which adapted modules it can see:
``"embeds"`` feeds the stored ``inputs_embeds`` (embedded once by the base: an adapted
input embedding never acts); ``"model-embeds"`` embeds the text rows with the input
embedding of the model under test and keeps the image rows, as XComposer does with
its vision features (embedding LoRA and a trained embedding act); ``"input_ids"``
feeds token ids only (a text-only probe; the model embeds them itself).

``token_ids``: ids the probe must hold (an adapter's trainable tokens, which change only those rows of the embedding):
written over every second real text position, cycling through them, so a random draw need not hit them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from harness.model import families

FEEDS = ("embeds", "model-embeds", "input_ids")
# ``mask=DETECT`` (probe_inputs, probe_logits): the mask keyword of the model's detected family (not a valid keyword)
DETECT = "<detected>"


@dataclass
class ProbeBatch:
    input_ids: torch.Tensor  # [B, T] token ids (image rows hold a placeholder id)
    inputs_embeds: torch.Tensor  # [B, T, H]
    im_mask: torch.Tensor  # [B, T] bool, True on image rows (passed under the family's mask keyword)
    attention_mask: torch.Tensor  # [B, T] long, 0 on padding
    description: str = field(default="")
    feed: str = "embeds"  # "embeds" | "model-embeds" | "input_ids" (module docstring)

    @property
    def text_rows(self) -> torch.Tensor:
        """Bool [B, T]: real (non-padding) text positions."""
        return ~self.im_mask & self.attention_mask.bool()

    @property
    def image_rows(self) -> torch.Tensor:
        return self.im_mask & self.attention_mask.bool()

    def model_kwargs(self, mask: str | None = None) -> dict:
        """Forward kwargs of the stored embeddings; ``mask``: the keyword that carries ``im_mask`` (``mask_kwarg``)."""
        kwargs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        if mask:
            kwargs[mask] = self.im_mask
        return kwargs


def make_probe(
    embedding: torch.nn.Module,
    *,
    batch_size: int = 2,
    seq_len: int = 12,
    image_spans: list[tuple[int, int]] | None = None,
    left_padding: list[int] | None = None,
    seed: int = 0,
    vocab_low: int = 4,
    feed: str = "embeds",
    token_ids: list[int] | tuple[int, ...] = (),
) -> ProbeBatch:
    """Build a probe batch from ``embedding`` (the model's input embedding module).

    ``image_spans`` are ``(start, end)`` positions marked as image rows in every
    sequence (default: the middle third); ``left_padding[b]`` pads sequence b on the left.
    ``feed``: how the probe reaches the model (see the module docstring); ``"input_ids"`` takes no image rows.
    ``token_ids``: ids placed at every second real text position (those outside the vocab are left out).
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, not {feed!r}")
    if feed == "input_ids" and image_spans:
        raise ValueError("an input_ids probe has no image rows: pass image_spans=[]")
    weight = embedding.weight
    vocab = weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_low, vocab, (batch_size, seq_len), generator=gen)
    im_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    if image_spans is None:
        image_spans = [(seq_len // 3, 2 * seq_len // 3)]
    for start, end in image_spans:
        im_mask[:, start:end] = True
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for b, pad in enumerate(left_padding or []):
        attention_mask[b, :pad] = 0
        im_mask[b, :pad] = False
    place_token_ids(input_ids, ~im_mask & attention_mask.bool(), [i for i in token_ids if 0 <= i < vocab])
    with torch.no_grad():
        embeds = embedding(input_ids.to(weight.device)).float().cpu()
        rms = embeds.pow(2).mean().sqrt()
        image_rows = torch.randn(batch_size, seq_len, weight.shape[1], generator=gen) * rms
        embeds = torch.where(im_mask[..., None], image_rows, embeds)
    shown = f" token_ids={list(token_ids)[:8]}" if token_ids else ""
    return ProbeBatch(
        input_ids=input_ids.to(weight.device),
        inputs_embeds=embeds.to(device=weight.device, dtype=weight.dtype),
        im_mask=im_mask.to(weight.device),
        attention_mask=attention_mask.to(weight.device),
        description=f"B={batch_size} T={seq_len} image_spans={image_spans} left_padding={left_padding} feed={feed}{shown}",
        feed=feed,
    )


def place_token_ids(input_ids: torch.Tensor, text: torch.Tensor, token_ids: list[int]) -> None:
    """Write ``token_ids`` (cycling) over every second position where ``text`` is True, row by row, in place."""
    if not token_ids:
        return
    slots = [(b, t) for b in range(text.shape[0]) for t in text[b].nonzero().flatten().tolist()[1::2]]
    for n, (b, t) in enumerate(slots):
        input_ids[b, t] = token_ids[n % len(token_ids)]


@contextmanager
def reached_modules(model: torch.nn.Module, names: list[str]) -> Iterator[set[str]]:
    """The modules among ``names`` that run while the block runs (forward hooks): an adapted module the probes
    never reach (a vision-tower LoRA when probes feed embeddings) has an effect no probe can measure."""
    modules = dict(model.named_modules())
    reached: set[str] = set()
    handles = [modules[name].register_forward_hook(lambda *_, name=name: reached.add(name))
               for name in names if name in modules]
    try:
        yield reached
    finally:
        for handle in handles:
            handle.remove()


def mask_kwarg(model: torch.nn.Module) -> str | None:
    """The forward keyword that marks image rows on ``model``: its detected family's (``ModelFamily.mask_kwarg``,
    e.g. XComposer's ``im_mask``), when the forward takes it as a named parameter or through ``**kwargs`` (the real
    XComposer reads ``kwargs["im_mask"]``). A PEFT wrapper is looked through. None for a family without one (plain
    causal LMs would reject or ignore it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keyword = families.family_of(inner).mask_kwarg
    if keyword is None:
        return None
    params = inspect.signature(inner.forward).parameters
    if keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return keyword
    return None
