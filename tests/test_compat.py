"""The supported-version range, and the version-dependent behaviour harness.compat probes.

CI runs this file on both ends of the range (requirements/dev.txt and requirements/oldest.txt), so
each probe is checked against the behaviour the installed PEFT/transformers really has.
"""

import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from packaging.version import Version

import harness
from harness import compat
from harness.cli import main
from harness.inputs.errors import InputError
from harness.loading.base import load_base


def test_the_installed_stack_is_inside_the_supported_range():
    assert compat.unsupported() == []
    compat.require_supported()


@pytest.mark.parametrize(
    "library, version, fragment",
    [("peft", "0.7.1", "peft 0.7.1 (supported: >=0.8,<1)"),
     ("transformers", "4.31.0", "transformers 4.31.0 (supported: >=4.33,<6)"),
     ("transformers", "6.0.0", "transformers 6.0.0 (supported: >=4.33,<6)")],
)
def test_unsupported_versions_are_refused_in_one_line(monkeypatch, capsys, library, version, fragment):
    monkeypatch.setitem(compat._INSTALLED, library, Version(version))
    with pytest.raises(compat.UnsupportedStack) as err:
        harness.check()
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert "pip install" in message and "'peft>=0.8,<1'" in message
    assert main(["check"]) == 2
    assert capsys.readouterr().err.strip() == f"plora-harness: {message}"


def test_unsupported_stack_fails_plugin_items_with_the_message(default_bundle, tmp_path):
    conftest = tmp_path / "conftest.py"
    conftest.write_text(
        "from packaging.version import Version\nfrom harness import compat\n"
        "compat._INSTALLED['peft'] = Version('0.7.1')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--plora-adapter", str(default_bundle.adapter_dir),
         str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "plora-harness does not support peft 0.7.1 (supported: >=0.8,<1)" in run.stdout


def _peft_raises_on_unknown_fields() -> bool:
    from peft import PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFTs that drop the field warn "Unexpected keyword arguments": the probe
            PeftConfig.from_peft_type(peft_type="LORA", r=4, lora_alpha=4, target_modules=["q"], not_a_field=None)
    except TypeError:
        return True
    return False


def test_unknown_config_field_probe_matches_the_installed_peft():
    assert compat.peft_drops_unknown_config_fields() is not _peft_raises_on_unknown_fields()


def test_lora_named_module_merge_probe_matches_the_documented_change():
    # merge_and_unload's "lora_" prefix filter was replaced by structural matching in 0.21.
    assert compat.merge_skips_lora_named_modules() is (compat.PEFT_VERSION < Version("0.21"))


def test_feature_probe_reads_the_installed_lora_config():
    from peft import LoraConfig

    assert compat.peft_supports("r") and compat.peft_supports("target_modules")
    assert not compat.peft_supports("plora_harness_no_such_field")
    assert compat.peft_supports("use_dora") is ("use_dora" in LoraConfig.__dataclass_fields__)


def test_model_folder_with_a_dot_in_its_name(default_bundle, tmp_path):
    """transformers 4.33 cannot import remote code from such a folder: one clear sentence, not a traceback."""
    dotted = shutil.copytree(default_bundle.base_dir, tmp_path / "internlm-xcomposer2.5-copy")
    try:
        model = load_base(dotted, dtype=torch.float32)
    except InputError as err:
        message = str(err)
        assert str(dotted) in message and "contains '.'" in message and "internlm-xcomposer2_5-copy" in message
        assert "\n" not in message
        assert compat.TRANSFORMERS_VERSION < Version("4.50")  # fixed in later transformers
    else:
        assert compat.TRANSFORMERS_VERSION >= Version("4.34")
        assert model.config.architectures == ["InternLMXComposer2ForCausalLM"]
