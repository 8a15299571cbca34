"""The suite's warning filters (pyproject ``filterwarnings``) silence exactly the warnings they name (issue 23, item 6):
a green run on either stack ends without library warnings, and a warning that differs in its text, category or
module still shows."""

from __future__ import annotations

import warnings

import pytest
from _pytest.warnings import parse_warning_filter

PYTREE = ("`torch.utils._pytree._register_pytree_node` is deprecated. Please use "
          "`torch.utils._pytree.register_pytree_node` instead.")


def _shown(pytestconfig: pytest.Config, message: str, category: type[Warning], module: str) -> bool:
    """Whether the suite's filters let ``message`` through, warned from ``module`` as a library warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for entry in pytestconfig.getini("filterwarnings"):
            warnings.filterwarnings(*parse_warning_filter(entry, escape=False))
        warnings.warn_explicit(message, category, filename=f"/x/{module.replace('.', '/')}.py", lineno=311,
                               module=module)
    return bool(caught)


def test_the_oldest_stacks_pytree_deprecation_is_filtered_and_nothing_else(pytestconfig):
    """transformers 4.33 (the oldest stack) calls a torch API deprecated since torch 2.2 when imported: once per
    process, ~5 lines per tier, nothing the harness can change."""
    assert not _shown(pytestconfig, PYTREE, FutureWarning, "transformers.utils.generic")
    assert _shown(pytestconfig, PYTREE, FutureWarning, "harness.loading.base")  # our own call would show
    assert _shown(pytestconfig, PYTREE.replace("register_pytree_node` instead", "other` instead"), FutureWarning,
                  "transformers.utils.generic")
    assert _shown(pytestconfig, "`torch.utils._pytree._register_pytree_node` is deprecated. Please use it",
                  FutureWarning, "transformers.utils.generic")
