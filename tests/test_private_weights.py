"""privatize_weights: same values in private memory; tied, converted and foreign parameters untouched."""

from __future__ import annotations

import torch

from harness.loading.base import load_base
from harness.loading.private_weights import privatize_weights


def test_private_copy_is_bit_identical_and_counts_every_stored_parameter(default_bundle):
    mapped = load_base(default_bundle.base_dir, dtype=torch.float32)
    private = load_base(default_bundle.base_dir, dtype=torch.float32, private=True)
    for (name, a), b in zip(mapped.state_dict().items(), private.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = load_base(default_bundle.base_dir, dtype=torch.float32)
    before = {n: p.data_ptr() for n, p in fresh.named_parameters()}
    moved = privatize_weights(fresh, default_bundle.base_dir)
    expected = sum(p.numel() * p.element_size() for p in fresh.parameters())
    assert moved == expected  # every parameter of this model is stored in its safetensors file, untied
    assert all(p.data_ptr() != before[n] for n, p in fresh.named_parameters())


def test_converted_tied_and_unknown_parameters_are_left_alone(default_bundle, tmp_path):
    bf16 = load_base(default_bundle.base_dir, dtype=torch.bfloat16)  # converted on load: file holds fp32
    assert privatize_weights(bf16, default_bundle.base_dir) == 0
    model = load_base(default_bundle.base_dir, dtype=torch.float32)
    model.output.weight = model.model.tok_embeddings.weight  # tied: one Parameter under two names
    moved = privatize_weights(model, default_bundle.base_dir)
    assert model.output.weight is model.model.tok_embeddings.weight  # still tied (moved once, by its first name)
    assert moved == sum(p.numel() * 4 for p in model.parameters())
    model = load_base(default_bundle.base_dir, dtype=torch.float32)
    shared = model.model.tok_embeddings.weight.data
    model.output.weight = torch.nn.Parameter(shared)  # two Parameters over one storage: left alone
    moved = privatize_weights(model, default_bundle.base_dir)
    assert model.output.weight.data_ptr() == model.model.tok_embeddings.weight.data_ptr() == shared.data_ptr()
    assert moved == sum(p.numel() * 4 for n, p in model.named_parameters()
                        if n not in ("output.weight", "model.tok_embeddings.weight"))
    assert privatize_weights(model, tmp_path / "no-such-dir") == 0  # unreadable: nothing moved, no error
