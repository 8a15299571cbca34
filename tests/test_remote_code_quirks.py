"""The real XComposer remote code's quirks, reproduced by the synthetic family, each answered right.

Every case builds the synthetic ixc2.5 base with one quirk of the real code switched on (see
``harness/synthetic/modeling/configuration_internlm_xcomposer2.py``: QUIRKS) and runs the real CLI in a
subprocess, as CI would: the engine child, the offline environment and the network block included.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.version import Version

from harness import compat
from harness.synthetic.bundle import build_merged_dir

TRANSFORMERS_5 = compat.TRANSFORMERS_VERSION >= Version("5")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "check", "--quiet", "--trust-remote-code", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def quirky(make_bundle):
    return lambda *quirks: make_bundle(quirks=tuple(quirks))


@pytest.mark.slow
def test_flash_attention_by_default_loads_eager_and_every_report_says_so(quirky, synthetic_cache, tmp_path):
    bundle = quirky("flash-default")
    assert json.loads((bundle.base_dir / "config.json").read_text())["attn_implementation"] == "flash_attention_2"
    merged = build_merged_dir(bundle, synthetic_cache)
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    run = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir), "--merged", str(merged),
               "--json", str(report), "--junit", str(junit))
    assert run.returncode == 0, run.stdout[-3000:]  # the merge-script reload included: flash decided per load
    notes = json.loads(report.read_text())["notes"]
    assert notes and "flash_attention_2" in notes[0] and "attn_implementation='eager'" in notes[0]
    assert "Notes" in run.stdout and "flash_attn is not installed" in run.stdout
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert "flash_attn is not installed" in properties["note.0"]


@pytest.mark.slow
def test_a_config_without_attn_implementation_is_decided_by_its_config_class(quirky, tmp_path):
    bundle = quirky("flash-default")
    base = shutil.copytree(bundle.base_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    del config["attn_implementation"]  # the config class turns a missing value into flash_attention_2
    (base / "config.json").write_text(json.dumps(config))
    report = tmp_path / "r.json"
    run = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(base), "--only", "key-coverage", "--only",
               "effect", "--json", str(report))
    assert run.returncode == 0, run.stdout[-3000:]
    assert any("flash_attention_2" in note for note in json.loads(report.read_text())["notes"])


@pytest.mark.slow
def test_im_mask_through_kwargs_reaches_plora(quirky, tmp_path):
    bundle = quirky("im-mask-kwargs")
    report = tmp_path / "r.json"
    run = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir), "--only", "effect",
               "--only", "plora-preserved", "--json", str(report))
    assert run.returncode == 0, run.stdout[-3000:]
    effect = next(c for c in json.loads(report.read_text())["checks"] if c["id"] == "effect")
    assert effect["details"]["relative_effect"]["image"] > 1e-3


@pytest.mark.slow
def test_a_url_fetched_while_building_is_one_line_naming_file_and_line(quirky):
    bundle = quirky("url-fetch")
    run = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir))
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    code = bundle.base_dir / "build_mlp.py"
    assert f"{code}:{_line_of(code, 'urlopen(')}:" in line and "reaches the network" in line
    assert "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.slow
def test_a_vision_tower_loaded_from_a_cwd_relative_path(quirky, tmp_path):
    bundle = quirky("relative-vision-tower")
    elsewhere = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir), cwd=tmp_path)
    assert elsewhere.returncode == 2, elsewhere.stdout[-3000:]
    (line,) = elsewhere.stderr.strip().splitlines()
    assert "'clip-vision-tower' is not a directory relative to the current directory" in line
    code = bundle.base_dir / "build_mlp.py"
    where = f"{code}:{_line_of(code, 'CLIPVisionModel.from_pretrained(')}"
    assert where in line
    here = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir), "--only", "key-coverage",
                "--only", "effect", cwd=bundle.base_dir)  # run from where the code expects: as users run it
    if TRANSFORMERS_5:  # transformers 5 refuses from_pretrained inside a model's __init__: said, with file:line
        assert here.returncode == 1 and where in here.stdout and "calls from_pretrained inside its __init__" in \
            here.stdout, here.stdout[-3000:]
    else:
        assert here.returncode == 0, here.stdout[-3000:]


def test_rotary_tables_in_non_persistent_buffers(quirky, tmp_path):
    bundle = quirky("rotary-buffers")
    report = tmp_path / "r.json"
    run = _cli("--adapter", str(bundle.adapter_dir), "--base-model", str(bundle.base_dir), "--only", "key-coverage",
               "--only", "path-agreement", "--json", str(report))
    if not TRANSFORMERS_5:  # transformers 4 initialises them as the constructor does
        assert run.returncode == 0, run.stdout[-3000:]
        return
    assert run.returncode == 1
    checks = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    code = bundle.base_dir / "modeling_internlm2.py"
    for check_id in ("key-coverage", "path-agreement"):
        message = checks[check_id]["message"]
        assert checks[check_id]["status"] == "fail" and "not in its checkpoint" in message
        assert re.search(rf"registered at {re.escape(str(code))}:\d+", message) and "transformers 4.x" in message
