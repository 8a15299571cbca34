"""A release's adapters, each with its own merged checkpoint, checked in one run (issue 23, item 2): merged
checkpoints pair with adapters by position or as ``--adapter A=M``; input that cannot be paired is a usage error."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.engine.plan import pair_merged
from harness.inputs.errors import InputError


@pytest.fixture(scope="module")
def release(default_bundle, make_bundle, synthetic_cache):
    """Two adapters of one base, each with its official merge."""
    from harness.synthetic.bundle import build_merged_dir

    other = make_bundle(lora_r=4, lora_alpha=8)
    assert other.base_dir == default_bundle.base_dir
    return {"base": default_bundle.base_dir,
            "a": default_bundle.adapter_dir, "ma": build_merged_dir(default_bundle, synthetic_cache),
            "b": other.adapter_dir, "mb": build_merged_dir(other, synthetic_cache)}


def _merged_verdicts(argv, tmp_path, capsys) -> tuple[int, list[tuple[str, str, str]]]:
    report = tmp_path / "r.json"
    code = main(["check", "--quiet", "--trust-remote-code", "--only", "merged-matches", "--json", str(report), *argv])
    capsys.readouterr()
    data = json.loads(report.read_text())
    return code, [(r["inputs"]["adapter"], r["inputs"].get("merged"), r["checks"][0]["status"])
                  for r in data["reports"]]


def test_merged_checkpoints_pair_with_their_adapters_by_position(release, tmp_path, capsys):
    """Before: the last --merged was compared with every adapter, so merged-matches failed adapter A falsely."""
    r = release
    code, verdicts = _merged_verdicts(["--base-model", str(r["base"]), "--adapter", str(r["a"]), "--merged",
                                       str(r["ma"]), "--adapter", str(r["b"]), "--merged", str(r["mb"])], tmp_path,
                                      capsys)
    assert verdicts == [(str(r["a"]), str(r["ma"]), "pass"), (str(r["b"]), str(r["mb"]), "pass")]
    assert code == 0


def test_a_swapped_pair_fails_the_adapter_it_does_not_belong_to(release, tmp_path, capsys):
    r = release
    code, verdicts = _merged_verdicts(["--base-model", str(r["base"]), "--adapter", f"{r['a']}={r['mb']}",
                                       "--adapter", f"{r['b']}={r['mb']}"], tmp_path, capsys)
    assert [v[2] for v in verdicts] == ["fail", "pass"] and code == 1


@pytest.mark.parametrize(("adapters", "merged", "fragment"), [
    (["a", "b"], ["m1", "m2", "m3"], "2 adapter(s) and 3 merged checkpoint(s) cannot be paired"),
    (["a", "b"], ["m1"], "2 adapter(s) and 1 merged checkpoint(s) cannot be paired"),
    (["a=m1", "b"], ["m2"], "both as --adapter A=M and as --merged"),
])
def test_unpairable_input_is_a_usage_error(adapters, merged, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pair_merged(adapters, merged)


def test_pairing_rules():
    assert pair_merged(["a", "b"], None) == [("a", None), ("b", None)]
    assert pair_merged(["a", "b"], ["ma", "mb"]) == [("a", "ma"), ("b", "mb")]
    assert pair_merged(["a=ma", "b"], None) == [("a", "ma"), ("b", None)]
    assert pair_merged(["a"], "ma") == [("a", "ma")]


def test_unpairable_input_exits_2_in_one_line_before_loading(release, capsys):
    r = release
    code = main(["check", "--base-model", str(r["base"]), "--adapter", str(r["a"]), "--adapter", str(r["b"]),
                 "--merged", str(r["ma"]), "--merged", str(r["mb"]), "--merged", str(r["ma"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot be paired" in err


def test_the_plugin_pairs_as_the_cli_does(release, pytester):
    r = release
    result = pytester.runpytest("-p", "no:cacheprovider", "--rootdir", str(pytester.path), "--plora-trust-remote-code",
                                f"--plora-base-model={r['base']}", "--plora-only=merged-matches",
                                f"--plora-adapter={r['a']}", f"--plora-merged={r['ma']}",
                                f"--plora-adapter={r['b']}", f"--plora-merged={r['mb']}")
    result.assert_outcomes(passed=2)
    bad = pytester.runpytest("-p", "no:cacheprovider", "--rootdir", str(pytester.path),
                             f"--plora-base-model={r['base']}", f"--plora-adapter={r['a']}",
                             f"--plora-adapter={r['b']}", f"--plora-merged={r['ma']}")
    assert bad.ret == 4 and "cannot be paired" in bad.stderr.str()


pytest_plugins = ["pytester"]
