"""PLoRA semantics: the branch acts on image rows only, in both real forward forms."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.synthetic.modeling.build_mlp import PLoRA


def make_plora(flatten_form: bool, *, r: int = 4, alpha: float = 8, legacy: bool = False) -> PLoRA:
    torch.manual_seed(0)
    layer = PLoRA(16, 24, bias=False, lora_r=r, lora_alpha=alpha, lora_dropout=0.0,
                  flatten_form=flatten_form, legacy_none_mask_crash=legacy)
    torch.nn.init.normal_(layer.Plora_B.weight)  # the real Plora_B is not zero
    return layer.eval()


masks = st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=3, max_size=3).map(
    lambda rows: torch.tensor(rows, dtype=torch.bool)
)


@pytest.mark.parametrize("flatten_form", [False, True], ids=["ixc2-form", "hd-form"])
@given(mask=masks)
def test_branch_touches_image_rows_only(flatten_form, mask):
    layer = make_plora(flatten_form)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x, mask)
        plain = torch.nn.functional.linear(x, layer.weight)
        branch = layer.Plora_B(layer.Plora_A(x)) * layer.lora_scaling
    torch.testing.assert_close(out[~mask], plain[~mask], rtol=0, atol=0)
    torch.testing.assert_close(out[mask], (plain + branch)[mask], rtol=1e-6, atol=1e-6)


def test_scaling_is_alpha_over_r():
    assert make_plora(False, r=4, alpha=8).lora_scaling == 2.0
    assert make_plora(False, r=256, alpha=256).lora_scaling == 1.0


def test_forms_agree():
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    a, b = make_plora(False), make_plora(True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(x, mask), b(x, mask))


@pytest.mark.parametrize("flatten_form", [False, True])
def test_none_mask_is_text_only(flatten_form):
    layer = make_plora(flatten_form)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, None), torch.nn.functional.linear(x, layer.weight), rtol=0, atol=0)


def test_legacy_hd_form_crashes_on_none_mask():
    layer = make_plora(True, legacy=True)
    with pytest.raises(AttributeError, match="view"):
        layer(torch.randn(1, 3, 16), None)
    layer(torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.bool))  # all-False mask works


def test_branch_stays_in_autograd_graph_without_image_rows():
    layer = make_plora(False).train()
    layer(torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.bool)).sum().backward()
    assert layer.Plora_A.weight.grad is not None
    assert torch.count_nonzero(layer.Plora_A.weight.grad) == 0
