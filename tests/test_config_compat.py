"""config-valid across PEFT versions: configs written by older and newer PEFT, read by the installed one.

The configs are the golden adapters' own adapter_config.json files (written by peft 0.8.2 ... 0.21.2's
save_pretrained) plus a config from a future PEFT. CI runs this file on both ends of the supported
range, so both directions are covered: an old config on a new PEFT, a new config on an old PEFT.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.runs import run_static
from harness import compat

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
WRITERS = sorted(p.name for p in GOLDEN.iterdir() if (p / "adapter_config.json").is_file())
METADATA = {"peft_version", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode"}


def config_valid(adapter_dir: Path):
    return run_static(adapter_dir).get("config-valid")


def adapter_copy(name: str, tmp_path: Path) -> Path:
    """The golden adapter's config and weights only (the recorded outputs are not part of an adapter)."""
    src, dst = GOLDEN / name, tmp_path / name
    dst.mkdir()
    for path in src.iterdir():
        if path.name.startswith("adapter_"):
            shutil.copyfile(path, dst / path.name)
    return dst


def test_configs_from_every_era_are_present():
    assert {"peft-0.8.2-lora", "peft-0.21.2-lora"} <= set(WRITERS) and len(WRITERS) >= 4


@pytest.mark.parametrize("name", WRITERS)
def test_config_written_by_another_peft(name, tmp_path):
    adapter_dir = adapter_copy(name, tmp_path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unknown = sorted(set(config) - compat.lora_config_fields())
    result = config_valid(adapter_dir)
    assert "\n" not in result.message
    if not unknown:  # an older (or the same) PEFT wrote it: every field is understood
        assert result.status == "pass", result.message
    elif not compat.peft_drops_unknown_config_fields():  # XComposer-era PEFT: the load itself fails
        assert result.status == "fail", result.message
        assert "raises TypeError" in result.message and unknown[0] in result.message
        if "peft_version" in config:
            assert f"peft>={config['peft_version']}" in result.fix
    else:  # a newer PEFT wrote it: unknown fields are dropped; only behaviour-changing ones fail
        behavioural = [k for k in unknown if k not in METADATA and config[k] not in (None, False, "", [], {})]
        assert result.status == ("fail" if behavioural else "warn"), result.message
        assert "drops them" in result.message


def test_newest_config_on_the_oldest_peft_and_oldest_config_on_the_newest():
    """The two directions CI exercises, stated plainly for the stack that is installed."""
    newest = json.loads((GOLDEN / "peft-0.21.2-lora" / "adapter_config.json").read_text())
    oldest = json.loads((GOLDEN / "peft-0.8.2-lora" / "adapter_config.json").read_text())
    assert set(oldest) <= set(newest)  # PEFT only ever added fields between these two
    if compat.PEFT_VERSION.release[:2] == (0, 8):
        assert not compat.peft_drops_unknown_config_fields()
        assert {"use_dora", "peft_version", "layer_replication"} <= set(newest) - compat.lora_config_fields()
    if compat.PEFT_VERSION >= compat.Version("0.21"):
        assert set(newest) <= compat.lora_config_fields()


def test_future_config_fails_or_warns_by_what_the_installed_peft_does(tmp_path):
    adapter_dir = adapter_copy("peft-0.21.2-lora", tmp_path)
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "peft_version": "9.0.0", "lora_future_switch": None}))
    result = config_valid(adapter_dir)
    if compat.peft_drops_unknown_config_fields():
        assert result.status == "warn" and "lora_future_switch" in result.message
    else:
        assert result.status == "fail" and "raises TypeError" in result.message
    assert "peft>=9.0.0" in result.fix or "upgrade peft" in result.fix
