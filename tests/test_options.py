"""Options declared once (issue 22, item 2): the CLI, the plugin's ``--plora-*`` options, the pyproject keys, the
``PLORA_HARNESS_*`` variables and the public API's signature are all the rows of ``harness.options.OPTIONS``;
one precedence (command line > variable > pyproject > default) for the CLI and the plugin; dtype one type."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import pytest

import harness
import harness.options
from harness.dtypes import DType
from harness.inputs.errors import InputError
from harness.options import FLAG, OPTIONS, Option
from harness.settings import load_settings, resolve

pytest_plugins = ["pytester"]

EXTRA = Option("calibration_seed", "ids", "a toy option added to the table by this test", metavar="N")


def _cli_flags(command: str = "check") -> set[str]:
    from harness.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def _plugin_flags(pytester) -> set[str]:
    text = pytester.runpytest("--help").stdout.str()
    section = text[text.index("LoRA adapter conformance (plora-harness)"):]
    section = section[:section.index("\n\n")]
    return {w.split("=")[0].rstrip(",") for w in section.split() if w.startswith("--plora-")}


def _api_keywords(function) -> set[str]:
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY}


API_OWN = {"check": {"isolated", "progress"}, "check_adapters": {"isolated", "progress", "verbose"}}


def test_the_cli_the_plugin_and_the_api_are_the_table(pytester):
    assert _cli_flags() == {o.flag for o in OPTIONS if o.cli}
    assert _cli_flags("demo") == {o.flag for o in OPTIONS if o.cli and o.group != "inputs"}
    assert _plugin_flags(pytester) == {o.plugin_option for o in OPTIONS if o.plugin}
    for name, own in API_OWN.items():
        assert _api_keywords(getattr(harness, name)) == {o.name for o in OPTIONS if o.api} | own, name
    keys = set(harness.options.settings_keys())
    assert keys == {k for o in OPTIONS if o.settings for k in (o.key, *o.aliases)}
    assert {"max-memory", "trained-on-quantized", "dtype", "timeout"} <= keys


def test_an_option_added_to_the_table_appears_everywhere(pytester, monkeypatch):
    """Adding one row is all it takes: the CLI's --help, the plugin's options, the API's signature, the
    pyproject key and the variable follow."""
    monkeypatch.setattr(harness.options, "OPTIONS", (*OPTIONS, EXTRA))  # one row, nothing else
    assert "--calibration-seed" in _cli_flags() and "--calibration-seed" in _cli_flags("demo")
    assert "--plora-calibration-seed" in _plugin_flags(pytester)
    seen = {}
    rebuilt = harness.options.api_options(lambda adapter=None, *, progress=None, **options: seen.update(options))
    assert "calibration_seed" in inspect.signature(rebuilt).parameters
    rebuilt("x", calibration_seed="7")
    assert seen["calibration_seed"] == ("7",)
    values = resolve("cli", {}, environ={"PLORA_HARNESS_CALIBRATION_SEED": "1,2"}, pyproject=None).values
    assert values["calibration_seed"] == ("1", "2")
    assert resolve("plugin", {"calibration_seed": ["3"]}, environ={}).values["calibration_seed"] == ("3",)
    pyproject = pytester.path / "pyproject.toml"
    pyproject.write_text('[tool.plora-harness]\ncalibration-seed = ["4"]\n')
    assert load_settings(pyproject)["calibration_seed"] == ("4",)


def test_the_api_keeps_a_real_signature_with_the_tables_defaults():
    signature = inspect.signature(harness.check)
    assert list(signature.parameters)[:3] == ["adapter", "base_model", "merged"]
    for option in OPTIONS:
        if option.api:
            parameter = signature.parameters[option.name]
            assert parameter.default == option.default and parameter.annotation == option.annotation
    assert "dtype: " in str(signature) and "**" not in str(signature)


def test_an_unknown_api_keyword_is_a_type_error_with_a_did_you_mean(default_bundle):
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtyp'; did you mean 'dtype'"):
        harness.check(default_bundle.adapter_dir, dtyp="float32")


@pytest.mark.parametrize(("keyword", "value", "message"), [
    ("dtype", "float64", "dtype 'float64' is not one of float32, bfloat16, float16"),
    ("device", "tpu", "device 'tpu' is not one of cpu, cuda"),
    ("timeout", -1, "timeout must be a positive number of seconds, not -1"),
    ("max_memory", "lots", "max_memory: memory size 'lots' is not a number"),
    ("only", 3, "only must be a string or a list of strings, not 3"),
    ("trust_remote_code", "yes", "trust_remote_code must be true or false, not 'yes'"),
])
def test_the_api_checks_each_value_at_the_door(default_bundle, keyword, value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        harness.check(default_bundle.adapter_dir, isolated=False, **{keyword: value})


def test_dtype_is_one_type_from_every_door(default_bundle, tmp_path):
    import torch

    from harness.api import plan_run
    from harness.engine.plan import Plan

    for given in ("bfloat16", DType.bfloat16, torch.bfloat16):
        plan, _ = plan_run([default_bundle.adapter_dir], dtype=given)
        assert plan.options.dtype is DType.bfloat16
        again = Plan.from_json(plan.to_json())  # as the engine process reads it
        assert again.options.dtype is DType.bfloat16 and again == plan
    assert json.loads(plan.to_json())["options"]["dtype"] == "bfloat16"
    assert DType.bfloat16.torch is torch.bfloat16 and f"{DType.float16}" == "float16"
    assert resolve("cli", {"dtype": "float16"}, environ={}).values["dtype"] is DType.float16
    (tmp_path / "pyproject.toml").write_text('[tool.plora-harness]\ndtype = "float32"\n')
    assert load_settings(tmp_path / "pyproject.toml")["dtype"] is DType.float32


PYPROJECT = '[tool.plora-harness]\nonly = ["finite"]\ndevice = "cpu"\ntimeout = 30\n'


@pytest.mark.parametrize(("command_line", "environ", "expected", "source"), [
    ({}, {}, ("finite",), "pyproject"),
    ({}, {"PLORA_HARNESS_ONLY": "shapes,noop"}, ("shapes", "noop"), "PLORA_HARNESS_ONLY"),
    ({"only": ["dtype-consistent"]}, {"PLORA_HARNESS_ONLY": "shapes"}, ("dtype-consistent",), "--only"),
])
def test_precedence_command_line_then_variable_then_pyproject_then_default(tmp_path, command_line, environ,
                                                                          expected, source):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    resolved = resolve("cli", command_line, environ=environ, pyproject=pyproject)
    assert resolved.values["only"] == expected
    assert source in resolved.sources["only"]
    assert resolved.values["timeout"] == 30.0 and resolved.values["skip"] == ()
    assert resolved.sources["skip"] is None  # the default
    plugin = resolve("plugin", command_line, environ=environ, pyproject=pyproject)
    assert plugin.values["only"] == expected  # the same order for the plugin


def test_timeout_none_on_the_command_line_is_no_limit_not_the_default(tmp_path):
    """Before: `--timeout none` parsed to None, which the settings then took for "not given" ('auto')."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    assert resolve("cli", {"timeout": "none"}, environ={}, pyproject=pyproject).values["timeout"] is None
    assert resolve("cli", {}, environ={"PLORA_HARNESS_TIMEOUT": "none"}, pyproject=pyproject).values["timeout"] is None


@pytest.mark.parametrize(("environ", "message"), [
    ({"PLORA_HARNESS_DEVICE": ""}, "PLORA_HARNESS_DEVICE is set but empty"),
    ({"PLORA_HARNESS_TRUST_REMOTE_CODE": "maybe"}, "PLORA_HARNESS_TRUST_REMOTE_CODE must be 1/true/yes or 0/false/no"),
    ({"PLORA_HARNESS_DTYPE": "fp8"}, "PLORA_HARNESS_DTYPE 'fp8' is not one of float32, bfloat16, float16"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(environ, message):
    with pytest.raises(InputError, match=re.escape(message)):
        resolve("cli", {}, environ=environ)


def test_a_bad_pyproject_value_names_the_file_and_the_key(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.plora-harness]\ntrained-on-quantized = "int4"\n')
    with pytest.raises(InputError, match=re.escape(f"{pyproject}: [tool.plora-harness] trained-on-quantized 'int4' is "
                                                   "not one of nf4, fp4, int8")):
        load_settings(pyproject)


def test_the_cli_reads_the_variable_under_the_command_line(default_bundle, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.setenv("PLORA_HARNESS_ADAPTER", str(default_bundle.adapter_dir))
    monkeypatch.setenv("PLORA_HARNESS_ONLY", "finite")
    assert main(["check", "--quiet", "--json", "-"]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["checks"]] == ["finite"]
    assert main(["check", "--quiet", "--json", "-", "--only", "noop"]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["checks"]] == ["noop"]
    monkeypatch.setenv("PLORA_HARNESS_ADAPTER", "")
    assert main(["check", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PLORA_HARNESS_ADAPTER is set but empty" in err


def test_a_bad_value_on_the_command_line_is_one_line_exit_2(default_bundle, capsys):
    from harness.cli import main

    assert main(["check", "--adapter", str(default_bundle.adapter_dir), "--timeout", "soon"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--timeout must be a positive number of seconds, 'auto' or 'none'" in err


def _clear_variables(monkeypatch) -> None:
    for option in OPTIONS:
        monkeypatch.delenv(option.env_var, raising=False)


def test_the_plugin_reads_tool_plora_harness_from_the_repositorys_pyproject(pytester, default_bundle, monkeypatch):
    """Before: only the CLI read [tool.plora-harness]; the plugin ignored it (and ran nothing)."""
    import shutil

    _clear_variables(monkeypatch)
    shutil.copytree(default_bundle.adapter_dir, pytester.path / "out" / "adapter")
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nmarkers = ["mine: the repository\'s own marker"]\n\n'
                               '[tool.plora-harness]\nadapter = "out/adapter"\nonly = ["finite", "noop"]\n')
    pytester.makepyfile("import pytest\n@pytest.mark.mine\ndef test_own():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--strict-markers")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*plora-conformance::adapter::finite PASSED*",
                                 "*plora-conformance::adapter::noop PASSED*"])
    # the command line wins over the pyproject, the variable sits between them
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--plora-only=shapes")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*plora-conformance::adapter::shapes PASSED*"])
    monkeypatch.setenv("PLORA_HARNESS_ONLY", "noop")
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*plora-conformance::adapter::noop PASSED*"])


def test_pyproject_inputs_without_an_adapter_are_a_plugin_usage_error(pytester, monkeypatch):
    _clear_variables(monkeypatch)
    pytester.makepyprojecttoml('[tool.plora-harness]\nbase-model = "models/base"\n')
    pytester.makepyfile("def test_own():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == 4
    assert "[tool.plora-harness] base-model given without an adapter" in result.stderr.str()


def test_the_plugin_uses_no_private_pytest_api():
    source = inspect.getsource(__import__("harness.pytest_plugin", fromlist=["x"]))
    assert "_ispytest" not in source and "_tmp_path_factory" not in source


def test_every_option_is_consistent():
    for option in OPTIONS:
        assert re.fullmatch(r"[a-z][a-z_]*", option.name), option.name
        if option.kind == FLAG:
            assert option.default is False, option.name
        if option.choices and option.default is not None:
            assert option.default in option.choices, option.name
        assert dataclasses.replace(option) == option
