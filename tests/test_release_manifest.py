"""A release manifest as input (issue 23, item 2): ``check --release FILE`` (JSON or TOML, a list of
{adapter, merged}) checks every adapter of a release against its own merged checkpoint in one run; a manifest
that cannot be used is a usage error, one line naming the file, what is wrong and the fix."""

from __future__ import annotations

import json
import os

import pytest

from harness.cli import main
from harness.inputs.errors import InputError
from harness.inputs.release import as_adapter_args, read_release


@pytest.fixture(scope="module")
def release(default_bundle, make_bundle, synthetic_cache):
    """Two adapters of one base, each with its official merge."""
    from harness.synthetic.bundle import build_merged_dir

    other = make_bundle(lora_r=4, lora_alpha=8)
    return {"base": default_bundle.base_dir,
            "a": default_bundle.adapter_dir, "ma": build_merged_dir(default_bundle, synthetic_cache),
            "b": other.adapter_dir, "mb": build_merged_dir(other, synthetic_cache)}


def _verdicts(manifest, base, tmp_path, capsys) -> tuple[int, list[tuple[str, str, str]]]:
    report = tmp_path / "r.json"
    code = main(["check", "--quiet", "--trust-remote-code", "--only", "merged-matches", "--json", str(report),
                 "--base-model", str(base), "--release", str(manifest)])
    capsys.readouterr()
    data = json.loads(report.read_text())
    return code, [(r["inputs"]["adapter"], r["inputs"].get("merged"), r["checks"][0]["status"] if r["checks"] else None)
                  for r in data["reports"]]


def test_a_json_manifest_checks_each_adapter_against_its_own_merged_checkpoint(release, tmp_path, capsys):
    r = release
    manifest = tmp_path / "release.json"
    manifest.write_text(json.dumps({"release": [{"adapter": str(r["a"]), "merged": str(r["ma"])},
                                                {"adapter": str(r["b"]), "merged": str(r["mb"])}]}))
    code, verdicts = _verdicts(manifest, r["base"], tmp_path, capsys)
    assert code == 0
    assert verdicts == [(str(r["a"]), str(r["ma"]), "pass"), (str(r["b"]), str(r["mb"]), "pass")]


def test_a_toml_manifest_with_relative_paths_and_a_swapped_pair_fails_that_adapter(release, tmp_path, capsys):
    r = release
    manifest = tmp_path / "sub" / "release.toml"
    manifest.parent.mkdir()
    rel = {key: os.path.relpath(r[key], manifest.parent) for key in ("a", "mb", "b")}
    manifest.write_text(f'[[release]]\nadapter = "{rel["a"]}"\nmerged = "{rel["mb"]}"\n\n'
                        f'[[release]]\nadapter = "{rel["b"]}"\n')
    assert read_release(manifest) == [(str(r["a"]), str(r["mb"])), (str(r["b"]), None)]
    code, verdicts = _verdicts(manifest, r["base"], tmp_path, capsys)
    assert code == 1
    assert verdicts == [(str(r["a"]), str(r["mb"]), "fail"), (str(r["b"]), None, None)]  # b: no merged, nothing planned


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("r.json", "{not json", "not valid JSON"),
    ("r.json", '{"release": []}', "no 'release' list of entries"),
    ("r.json", '{"adapters": []}', "unknown top-level key 'adapters'"),
    ("r.json", '{"release": ["a"]}', "entry 1 is not a table with 'adapter'"),
    ("r.json", '[{"adapter": "a", "merge": "m"}]', "entry 1 has an unknown key 'merge'"),
    ("r.json", '[{"merged": "m"}]', "entry 1 has no 'adapter' path"),
    ("r.json", '[{"adapter": "a", "merged": 3}]', "'merged' must be a directory path"),
    ("r.json", '[{"adapter": "a=b"}]', "holds '='"),
    ("r.toml", "[[release]\nadapter = 1", "not valid TOML"),
])
def test_an_unusable_manifest_is_one_line_naming_the_file(tmp_path, name, text, fragment):
    manifest = tmp_path / name
    manifest.write_text(text)
    with pytest.raises(InputError, match=fragment) as caught:
        read_release(manifest)
    assert str(manifest) in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_manifest_exits_2_in_one_line(tmp_path, capsys):
    assert main(["check", "--release", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such release manifest" in err


def test_pairs_travel_as_adapter_values():
    assert as_adapter_args([("/a", "/ma"), ("/b", None)]) == ["/a=/ma", "/b"]
