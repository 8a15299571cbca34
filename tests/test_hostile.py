"""Hostile inputs: the CLI, run in a subprocess per case, never says "exit 0" when it did not check.

Every case of ``fixtures.hostile.CASES`` and every hypothesis-made corruption of a real adapter must
keep these invariants:

* no hang (a wall-clock limit, ``PLORA_HOSTILE_TIMEOUT`` seconds, default 120; the process group is killed);
* exit code 1 or 2 (0 only where the input is not broken; never a signal);
* exit 2: exactly one line on stderr (progress lines starting with "... " aside);
* exit 1: the JSON report and the JUnit XML parse and list the same checks, and a check failed;
* no "Traceback" in stdout or stderr;
* no raw control characters (ESC, NUL, BEL) and no line over 2,000 characters in the terminal output;
* the input directories byte-identical afterwards (contents, modes, file kinds, symlink targets);

and each case's own expectation (``fixtures.hostile.Expect``): which answer, which check ids fail,
what the answer must mention, which checks must not fail (a wrong diagnosis), the payload not run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from fixtures.hostile import CASES, CONFIG, REDOS, SAFETENSORS, Built, Case, Expect, Sources, write_safetensors_raw
from harness.inputs.deepspeed import is_zero_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = float(os.environ.get("PLORA_HOSTILE_TIMEOUT", "120"))
MAX_LINE = 2000
CONTROL_BYTES = (b"\x1b", b"\x00", b"\x07")


# -- running the CLI ---------------------------------------------------------------------------------------


@dataclass
class Run:
    argv: list[str]
    returncode: int | None  # None: killed after TIMEOUT
    stdout: bytes
    stderr: bytes
    seconds: float
    json_path: Path
    junit_path: Path

    @property
    def hung(self) -> bool:
        return self.returncode is None

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def describe(self) -> str:
        def tail(text: str) -> str:
            text = text if len(text) < 3000 else "..." + text[-3000:]
            return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:4000]

        state = "HUNG" if self.hung else f"exit {self.returncode}"
        return f"{state} after {self.seconds:.1f}s\nstdout: {tail(self.out)}\nstderr: {tail(self.err)}"


def run_cli(built: Built, *, trust: bool, out_dir: Path) -> Run:
    """``python -m harness.cli check ...``: in its own session (so a hang can be killed with its children)
    when the run loads a model; adapter-only runs, which the CLI keeps in its own process, through
    ``harness.cli.main`` in this process under an alarm (same code, no interpreter and torch start-up)."""
    if built.base is None and built.merged is None and not is_zero_checkpoint(built.adapter):
        return _run_main(built, trust=trust, out_dir=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, junit_path = out_dir / "report.json", out_dir / "report.xml"
    argv = [sys.executable, "-m", "harness.cli", "check", "--adapter", str(built.adapter)]
    if built.base is not None:
        argv += ["--base-model", str(built.base)]
    if built.merged is not None:
        argv += ["--merged", str(built.merged)]
    argv += ["--json", str(json_path), "--junit", str(junit_path)]
    if trust:
        argv.append("--trust-remote-code")
    argv += built.extra_args
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_MODULES_CACHE"] = str(out_dir / "hf-modules")  # payload code stays out of the shared cache
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONFAULTHANDLER", None)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=out_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the CLI and any child it made
        stdout, stderr = proc.communicate()
        code = None
    return Run(argv, code, stdout, stderr, time.monotonic() - start, json_path, junit_path)


def _run_main(built: Built, *, trust: bool, out_dir: Path) -> Run:
    import contextlib
    import io
    import traceback

    from harness.cli import main

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, junit_path = out_dir / "report.json", out_dir / "report.xml"
    argv = ["check", "--adapter", str(built.adapter), "--json", str(json_path), "--junit", str(junit_path)]
    argv += (["--trust-remote-code"] if trust else []) + list(built.extra_args)
    stdout, stderr = io.StringIO(), io.StringIO()

    def hung(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(max(1, int(TIMEOUT)))
    start = time.monotonic()
    code: int | None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    except TimeoutError:
        code = None
    except BaseException:  # noqa: BLE001 - a traceback is what the invariants look for
        stderr.write(traceback.format_exc())
        code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Run(argv, code, stdout.getvalue().encode(), stderr.getvalue().encode(), time.monotonic() - start,
               json_path, junit_path)


# -- invariants ----------------------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following symlinks, never opening a non-regular file)."""
    found: dict[str, tuple] = {}

    def visit(path: Path, rel: str) -> None:
        info = os.lstat(path)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[rel] = ("dir", mode)
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}")
        elif stat.S_ISREG(info.st_mode):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            found[rel] = ("file", mode, info.st_size, digest.hexdigest())
        else:
            found[rel] = ("special", stat.S_IFMT(info.st_mode), mode)

    visit(Path(root), ".")
    return found


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@dataclass
class Outcome:
    """What a run produced, parsed; ``report`` is the JSON report (None when absent)."""

    run: Run
    report: dict | None
    json_text: str | None

    @property
    def failing(self) -> dict[str, dict]:
        return {c["id"]: c for c in (self.report or {}).get("checks", []) if c.get("status") == "fail"}


def check_invariants(run: Run, *, allow_ok: bool, inputs_before: dict[Path, dict]) -> Outcome:
    """The invariants every hostile input keeps (module docstring); returns the parsed report."""
    assert not run.hung, f"hang: no answer within {TIMEOUT:.0f}s\n{run.describe()}"
    traceback = "Traceback" in run.out + run.err
    assert not traceback, f"a traceback\n{run.describe()}"
    assert run.returncode >= 0, f"killed by signal {-run.returncode}\n{run.describe()}"
    allowed = {0, 1, 2} if allow_ok else {1, 2}
    assert run.returncode in allowed, f"exit {run.returncode}, want one of {sorted(allowed)}\n{run.describe()}"

    for stream, data in (("stdout", run.stdout), ("stderr", run.stderr)):
        raw = [byte for byte in CONTROL_BYTES if byte in data]  # computed first: no 10 MB assertion reprs
        assert not raw, f"raw control character(s) {raw} on {stream}\n{run.describe()}"
        longest = max((len(line) for line in data.split(b"\n")), default=0)
        assert longest <= MAX_LINE, f"a {longest}-byte line on {stream} (limit {MAX_LINE})\n{run.describe()}"

    for path, before in inputs_before.items():
        assert tree_digest(path) == before, f"the input {path} changed during the run"

    report = json_text = None
    if run.returncode == 2:
        lines = [line for line in run.err.splitlines() if line.strip() and not line.startswith("... ")]
        assert len(lines) == 1, f"exit 2 must give exactly one line on stderr, got {len(lines)}\n{run.describe()}"
    else:
        assert run.json_path.is_file(), f"exit {run.returncode} but no JSON report\n{run.describe()}"
        json_text = run.json_path.read_text(encoding="utf-8")
        report = _strict_json(json_text)
        ids = [c["id"] for c in report["checks"]]
        try:
            junit = ET.parse(run.junit_path).getroot()
        except (ET.ParseError, OSError) as err:
            raise AssertionError(f"the --junit output does not parse: {err}\n{run.describe()}") from None
        assert [case.get("name") for case in junit.iter("testcase")] == ids, "JUnit and JSON list different checks"
        failing = [c["id"] for c in report["checks"] if c["status"] == "fail"]
        if run.returncode == 1:
            assert failing, f"exit 1 but no check failed in the JSON report\n{run.describe()}"
            for check_id in failing:
                assert re.search(rf"^{re.escape(check_id)}\s+FAIL\b", run.out, re.M), \
                    f"{check_id} fails in the JSON but not in the table on stdout\n{run.describe()}"
        else:
            assert not failing, f"exit 0 with failing checks {failing}"
        internal = [c["id"] for c in report["checks"] if "internal error" in c["message"].lower()]
        assert not internal, f"checks {internal} report an internal error instead of a diagnosis\n{run.describe()}"
    return Outcome(run, report, json_text)


def _json_strings(value):
    """Every string (keys included) inside a parsed JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def check_expectation(outcome: Outcome, expect: Expect, built: Built) -> None:
    run = outcome.run
    code = run.returncode
    if code == 2:
        assert expect.exit2, f"exit 2, but this input must be reported by {expect.fails or 'a full report'}\n" \
                             f"{run.describe()}"
        line = next(line for line in run.err.splitlines() if line.strip() and not line.startswith("... "))
        for pattern in expect.mention:
            assert re.search(pattern, line, re.I), f"the exit-2 line does not mention /{pattern}/: {line!r}"
    elif code == 1:
        assert expect.fails or expect.full_report or expect.allow_ok, \
            f"exit 1, but this input must be refused with exit 2\n{run.describe()}"
        failing = outcome.failing
        if expect.fails:
            assert set(failing) & set(expect.fails), \
                f"none of {list(expect.fails)} failed; failing: {sorted(failing)}\n{run.describe()}"
        if expect.mention:
            texts = [f"{c['message']} {json.dumps(c.get('details'))}" for c in failing.values()]
            for pattern in expect.mention:
                assert any(re.search(pattern, text, re.I) for text in texts), \
                    f"no failing check mentions /{pattern}/\n{run.describe()}"
        for check_id in expect.not_failing:
            assert check_id not in failing, f"{check_id} must not fail here (wrong diagnosis): " \
                                            f"{failing[check_id]['message']}"
        if expect.full_report:
            from fixtures.runs import planned_check_ids

            planned = planned_check_ids(base_model=built.base is not None, merged=built.merged is not None)
            reported = [c["id"] for c in outcome.report["checks"]]
            assert set(planned) <= set(reported), f"incomplete report: missing {sorted(set(planned) - set(reported))}"
            for check_id in planned:
                assert re.search(rf"^{re.escape(check_id)}\s+(PASS|FAIL|WARN|SKIP)\b", run.out, re.M), \
                    f"{check_id} missing from the table on stdout\n{run.describe()}"
    else:
        assert expect.allow_ok, f"exit 0 for a broken input\n{run.describe()}"
    if code in (0, 1):
        strings = list(_json_strings(outcome.report))
        for text in built.json_contains:
            found = text in outcome.json_text or any(text in value for value in strings)
            assert found, f"the JSON report lacks {text[:80]!r}"
    if expect.marker_absent and built.marker is not None:
        assert not built.marker.exists(), f"the payload ran: {built.marker} exists"


# -- hypothesis: corruptions of a real adapter ------------------------------------------------------------------
# (first in the file: its minute of subprocesses then starts first on one xdist worker, not last and alone)

# The oracle. An adapter is *broken* when any of these refuses it (then exit 0 is forbidden); otherwise
# it is *valid* and every exit code is allowed (the harness may still fail a check, e.g. shapes when r
# was changed, or refuse with exit 2), while the invariants above hold either way.
#   1. file kinds: adapter_config.json and adapter_model.safetensors are regular files (lstat; a
#      symlink, FIFO, directory or missing file is broken: the spec refuses non-regular files);
#   2. the safetensors library: safe_open + get_tensor of every tensor succeeds (its own header rules);
#   3. strict JSON for adapter_config.json: UTF-8, no NaN/Infinity, Python parses it (depth, int size);
#   4. PEFT's own config class: PeftConfig.from_pretrained(dir) returns a LoraConfig without raising;
#   5. the spec's rules on top of PEFT (PEFT does not check them): r a positive int, lora_alpha a finite
#      number, a target_modules string and every rank_pattern / alpha_pattern key compile as regexes (in
#      the form PEFT matches them).
# The oracle never opens a non-regular file (rule 1 runs first), so it cannot hang on a FIFO itself.


def adapter_problem(adapter: Path) -> str | None:
    """Why the oracle calls this adapter broken, or None when it is valid (see above)."""
    import re as regex

    for name in (CONFIG, SAFETENSORS):
        try:
            mode = os.lstat(adapter / name).st_mode
        except FileNotFoundError:
            return f"{name} missing"
        if not stat.S_ISREG(mode):
            return f"{name} is not a regular file"
    try:
        from safetensors import safe_open

        with safe_open(str(adapter / SAFETENSORS), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - any refusal by the library is the answer
        return f"safetensors refuses the file: {type(err).__name__}: {str(err)[:200]}"
    try:
        config = _strict_json((adapter / CONFIG).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:
        return f"adapter_config.json is not strict JSON: {type(err).__name__}"
    if not isinstance(config, dict):
        return "adapter_config.json is not an object"
    try:
        from peft import LoraConfig, PeftConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftConfig.from_pretrained(str(adapter))
        if not isinstance(loaded, LoraConfig):
            return f"PEFT reads a {type(loaded).__name__}, not a LoraConfig"
    except Exception as err:  # noqa: BLE001
        return f"PEFT refuses the config: {type(err).__name__}: {str(err)[:200]}"
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (type(r) is int and r > 0):
        return f"r is {r!r}"
    if not (type(alpha) in (int, float) and math.isfinite(alpha)):
        return f"lora_alpha is {alpha!r}"
    # compiled in the form PEFT uses them: target_modules as is (re.fullmatch), pattern keys inside
    # get_pattern_key's rf"(.*\.)?({key})$"
    patterns = [config["target_modules"]] if isinstance(config.get("target_modules"), str) else []
    for field_name in ("rank_pattern", "alpha_pattern"):
        if isinstance(config.get(field_name), dict):
            patterns += [rf"(.*\.)?({key})$" for key in config[field_name]]
    for pattern in patterns:
        try:
            regex.compile(pattern)
        except (regex.error, RecursionError, OverflowError) as err:
            return f"regex {pattern!r} does not compile: {err}"
    return None


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
                | st.floats(allow_nan=True, allow_infinity=True))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
RAW_SPECIALS = st.sampled_from(["NaN", "-Infinity", "1e309", "9" * 5000, "[" * 50_000 + "]" * 50_000, '"\\ud800"'])
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "F4", "F6_E2M3", "C64",
                          "F128", "f32", "", "STR"])
NAME_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
CONFIG_FIELDS = st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "bias", "rank_pattern",
                                 "alpha_pattern", "use_rslora", "use_dora", "lora_dropout", "modules_to_save",
                                 "layers_to_transform", "fan_in_fan_out", "task_type", "unknown_field"])

CORRUPTION = st.one_of(
    st.tuples(st.just("prefix_delta"), st.integers(-64, 64).filter(bool)),
    st.tuples(st.just("prefix_value"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("dtype"), st.integers(0, 99), DTYPES | JSON_VALUES),
    st.tuples(st.just("shape"), st.integers(0, 99), st.lists(st.integers(-2, 2**70) | st.integers(0, 40), max_size=4)
              | JSON_VALUES),
    st.tuples(st.just("offset_delta"), st.integers(0, 99), st.integers(0, 1), st.integers(-16, 16).filter(bool)),
    st.tuples(st.just("offsets"), st.integers(0, 99), JSON_VALUES),
    st.tuples(st.just("drop_field"), st.integers(0, 99), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("metadata"), st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3) | JSON_VALUES),
    st.tuples(st.just("rename"), st.integers(0, 99), NAME_TEXT),
    st.tuples(st.just("header_text"), st.sampled_from(["lead-space", "lead-newline", "trailing-nul", "bom",
                                                        "duplicate-key", "raw-special"]), RAW_SPECIALS),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("config_value"), CONFIG_FIELDS, JSON_VALUES),
    st.tuples(st.just("config_raw"), CONFIG_FIELDS, RAW_SPECIALS),
    st.tuples(st.just("config_drop"), CONFIG_FIELDS),
    st.tuples(st.just("kind"), st.sampled_from([CONFIG, SAFETENSORS]),
              st.sampled_from(["fifo", "directory", "empty", "symlink-out", "symlink-dangling", "missing"])),
)


def _header(path: Path) -> tuple[dict, bytes, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :], data[8 : 8 + n]


def _nth_tensor(header: dict, index: int) -> str:
    names = [k for k in header if k != "__metadata__"]
    return names[index % len(names)]


def apply_corruption(adapter: Path, outside: Path, corruption: tuple) -> None:
    """Apply one corruption to the copy ``adapter`` (helper files go to ``outside``); no-op when inapplicable."""
    op, *args = corruption
    weights, config_path = adapter / SAFETENSORS, adapter / CONFIG
    if op.startswith("config"):
        if not (os.path.lexists(config_path) and stat.S_ISREG(os.lstat(config_path).st_mode)):
            return  # gone or not a file any more (an earlier "kind" corruption)
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, RecursionError):
            return  # an earlier corruption already made it unreadable
        if not isinstance(config, dict):
            return
        if op == "config_drop":
            config.pop(args[0], None)
            config_path.write_text(json.dumps(config))
        elif op == "config_value":
            config[args[0]] = args[1]
            config_path.write_text(json.dumps(config, allow_nan=True))
        else:
            config[args[0]] = "@@raw@@"
            config_path.write_text(json.dumps(config).replace('"@@raw@@"', args[1]))
        return
    if op == "kind":
        target = adapter / args[0]
        if os.path.lexists(target) and not os.path.isdir(target):
            target.unlink()
        elif os.path.isdir(target):
            shutil.rmtree(target)
        kind = args[1]
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "directory":
            target.mkdir()
        elif kind == "empty":
            target.write_bytes(b"")
        elif kind == "symlink-out":
            copy = outside / f"outside-{args[0]}"
            if not copy.exists():
                copy.write_bytes(b"{}" if args[0] == CONFIG else b"\0" * 8)
            target.symlink_to(copy)
        elif kind == "symlink-dangling":
            target.symlink_to(outside / "does-not-exist")
        return
    if not (os.path.lexists(weights) and stat.S_ISREG(os.lstat(weights).st_mode)):
        return  # the weights file is gone or not a file any more: nothing to corrupt inside it
    data = weights.read_bytes()
    if op == "prefix_delta":
        (n,) = struct.unpack("<Q", data[:8])
        weights.write_bytes(struct.pack("<Q", max(0, n + args[0])) + data[8:])
        return
    if op == "prefix_value":
        weights.write_bytes(struct.pack("<Q", args[0]) + data[8:])
        return
    if op == "truncate":
        weights.write_bytes(data[: int(len(data) * args[0])])
        return
    if op == "append":
        weights.write_bytes(data + args[0])
        return
    try:
        header, body, raw = _header(weights)
    except (ValueError, struct.error, RecursionError):
        return  # an earlier corruption already broke the header
    if not isinstance(header, dict) or not [k for k in header if k != "__metadata__"]:
        return
    if op == "header_text":
        style, special = args
        text = raw.decode("utf-8", "replace").rstrip()
        new = {"lead-space": " " + text, "lead-newline": "\n" + text, "trailing-nul": text + "\0",
               "bom": "\ufeff" + text,
               "duplicate-key": text[:-1] + ", " + json.dumps(_nth_tensor(header, 0)) + ": "
               + json.dumps(header[_nth_tensor(header, 0)]) + "}",
               "raw-special": text[:-1] + ', "x": ' + special + "}"}[style]
        write_safetensors_raw(weights, new, body)
        return
    if op == "metadata":
        header["__metadata__"] = args[0]
    else:
        name = _nth_tensor(header, args[0])
        entry = header[name]
        if not isinstance(entry, dict):
            return
        if op == "dtype":
            entry["dtype"] = args[1]
        elif op == "shape":
            entry["shape"] = args[1]
        elif op == "offsets":
            entry["data_offsets"] = args[1]
        elif op == "offset_delta":
            offsets = entry.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
                offsets[args[1]] += args[2]
        elif op == "drop_field":
            entry.pop(args[1], None)
        elif op == "rename":
            header = {(args[1] if k == name else k): v for k, v in header.items()}
    write_safetensors_raw(weights, json.dumps(header, allow_nan=True), body)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("PLORA_HOSTILE_EXAMPLES", "12")),
          phases=(Phase.explicit, Phase.generate),  # no shrinking: every example is a 5-10 s subprocess
          report_multiple_bugs=False)
@given(corruptions=st.lists(CORRUPTION, min_size=1, max_size=2))
def test_corrupted_adapter_keeps_the_invariants(corruptions, default_bundle, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    adapter = work / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter, symlinks=True)
    for corruption in corruptions:
        apply_corruption(adapter, work, corruption)
    problem = adapter_problem(adapter)
    built = Built(adapter=adapter)
    before = {adapter: tree_digest(adapter)}
    run = run_cli(built, trust=False, out_dir=work / "out")
    try:
        check_invariants(run, allow_ok=problem is None, inputs_before=before)
    except AssertionError as err:
        raise AssertionError(f"oracle: {problem or 'valid adapter'}\n{err}") from None


# -- the catalogue ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hostile_sources(default_bundle, synthetic_cache) -> Sources:
    from harness.synthetic.bundle import build_merged_dir

    return Sources(adapter=default_bundle.adapter_dir, base=default_bundle.base_dir,
                   merged_factory=lambda: build_merged_dir(default_bundle, synthetic_cache))


# One case per class runs unmarked (about a minute with -n 2 on a busy 2-core machine); every other case and
# the hypothesis test are marked slow: each is a fresh interpreter importing torch, transformers and PEFT
# (5-12 s), and the --base-model cases load a model as well.
SMOKE = {"config-fifo", "config-alpha-nan", "header-deep", "tensor-name-control-chars", "bin-random-bytes",
         "rank-pattern-bad-regex"}


def _marks(case: Case):
    return [] if case.name in SMOKE else [pytest.mark.slow]


@pytest.mark.parametrize("case", [pytest.param(c, id=name, marks=_marks(c)) for name, c in CASES.items()
                                  if not c.covered_by])
def test_hostile_case(case: Case, hostile_sources: Sources, tmp_path: Path):
    sources_before = {p: tree_digest(p) for p in (hostile_sources.adapter, hostile_sources.base)}
    built = case.build(hostile_sources, tmp_path / "in")
    before = {p: tree_digest(p) for p in built.input_dirs()}
    run = run_cli(built, trust=case.trust, out_dir=tmp_path / "out")
    outcome = check_invariants(run, allow_ok=case.expect.allow_ok, inputs_before=before)
    check_expectation(outcome, case.expect, built)
    assert {p: tree_digest(p) for p in sources_before} == sources_before, "a source directory was modified"


def test_catalogue_is_well_formed():
    assert len(CASES) >= 30 and SMOKE <= set(CASES)
    for name, case in CASES.items():
        expect = case.expect
        assert expect.exit2 or expect.fails or expect.full_report or expect.allow_ok, name
        assert case.corrupts, name
        assert not (case.covered_by and name in SMOKE), name
        if case.covered_by:  # the test that runs it instead exists
            file, test = case.covered_by.split("::")
            assert re.search(rf"^def {re.escape(test)}\(", (ROOT / file).read_text(), re.M), case.covered_by


# -- in process: config-valid's answers and the regex deadline (milliseconds each, no subprocess) -----------------


def _config_valid(adapter: Path, edit=None):
    """config-valid on ``adapter`` with ``edit(config)`` applied to the parsed config (values JSON cannot hold,
    such as NaN, reach the check this way: a config built in memory, e.g. by check_trained's callers)."""
    from harness.checks import CheckContext, CheckOptions
    from harness.checks.registry import get_check, run_check
    from harness.inputs.adapter_dir import read_adapter

    ctx = CheckContext(adapter=read_adapter(adapter), options=CheckOptions())
    if edit is not None:
        edit(ctx.adapter.config)
    try:
        return run_check(get_check("config-valid"), ctx)
    finally:
        ctx.adapter.close()


@pytest.mark.parametrize(
    ("field_name", "value", "fragment"),
    [
        ("r", 0, "r must be a positive integer"),
        ("r", -4, "r must be a positive integer"),
        ("r", True, "r must be a positive integer, not True"),
        ("r", 8.0, "r must be a positive integer"),
        ("r", 10**30, "over 65,536"),
        ("lora_alpha", float("nan"), "lora_alpha is nan, not a finite number"),
        ("lora_alpha", float("inf"), "lora_alpha is inf, not a finite number"),
        ("lora_alpha", float("-inf"), "not a finite number"),
        ("lora_alpha", 0, "lora_alpha is 0"),
        ("lora_alpha", -16, "lora_alpha is negative"),
        ("lora_alpha", False, "lora_alpha must be a number, not False"),
        ("lora_alpha", 1e300, "over 1,000,000"),
        ("rank_pattern", {"wqkv": 0}, "rank_pattern['wqkv'] must be a positive integer"),
        ("alpha_pattern", {"wqkv": float("nan")}, "alpha_pattern['wqkv'] is nan"),
    ],
)
def test_config_valid_bounds_rank_and_alpha(default_bundle, field_name, value, fragment):
    result = _config_valid(default_bundle.adapter_dir, lambda c: c.update({field_name: value}))
    assert result.id == "config-valid" and result.status == "fail", result.message
    assert fragment in result.message and result.details["fields"] == [field_name], result.details
    assert fragment in result.details["problems"][0]


@pytest.mark.parametrize(
    ("changes", "field_name", "fragment"),
    [
        ({"target_modules": "(unclosed"}, "target_modules", "not a valid regular expression"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern", "rank_pattern key '(' is not a valid regular expression"),
        ({"alpha_pattern": {"[": 2}}, "alpha_pattern", "alpha_pattern key '[' is not a valid regular expression"),
        ({"layers_pattern": "(", "layers_to_transform": [0]}, "layers_pattern", "not a valid regular expression"),
        ({"target_modules": "(" * 5000 + ")" * 5000}, "target_modules", "not a valid regular expression"),
        ({"target_modules": REDOS}, "target_modules", "too costly to match"),
        ({"rank_pattern": {REDOS: 4}}, "rank_pattern", "too costly to match"),
        ({"alpha_pattern": {REDOS: 2}}, "alpha_pattern", "too costly to match"),
    ],
)
def test_config_valid_compiles_and_times_every_regex(default_bundle, changes, field_name, fragment):
    started = time.monotonic()
    result = _config_valid(default_bundle.adapter_dir, lambda c: c.update(changes))
    assert time.monotonic() - started < 20
    assert result.status == "fail" and fragment in result.message, result.message
    assert field_name in result.details["fields"] and "regex" in result.fix


def test_the_regex_deadline_holds_outside_the_main_thread(default_bundle):
    """No timer can interrupt re there: the match runs in a child interpreter, killed at the deadline."""
    import threading

    from harness.inputs import patterns

    box = {}
    pattern = patterns.ConfigPattern("target_modules", REDOS + "x", REDOS + "x", "fullmatch")  # not cached yet
    thread = threading.Thread(target=lambda: box.update(answer=_catch(patterns.bounded_matches, pattern,
                                                                      ["model.layers.0.attention.wqkv"])))
    started = time.monotonic()
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 20
    assert isinstance(box["answer"], patterns.PatternTooCostly) and "too costly" in str(box["answer"])
    benign = patterns.ConfigPattern("target_modules", r".*wqkv", r".*wqkv", "fullmatch")
    thread = threading.Thread(target=lambda: box.update(answer=patterns.bounded_matches(benign, ["a.wqkv", "a.wo"])))
    thread.start()
    thread.join(30)
    assert box["answer"] == ["a.wqkv"]


def _catch(func, *args):
    try:
        return func(*args)
    except Exception as err:  # noqa: BLE001 - returned for the assertion
        return err


def test_pattern_key_splices_keys_as_the_installed_peft_does():
    """Against PEFT's own get_pattern_key where it has one (0.14+); PEFT 0.8-0.13 match rf".*\\.{key}$" inline."""
    from harness.model.lora_math import pattern_key

    names = ["model.layers.0.attention.wqkv", "lm_head", "model.layers.1.feed_forward.w1", "x.wqkvz"]
    keys = ["wqkv", "lm_head", r"layers\.1\..*", "w1|w2"]
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        def get_pattern_key(pattern_keys, key_to_match):
            return next(filter(lambda key: re.match(rf".*\.{key}$", key_to_match), pattern_keys), key_to_match)
    for name in names:
        expected = get_pattern_key(keys, name)
        assert (pattern_key(keys, name) or name) == expected, name
    started = time.monotonic()
    assert pattern_key([REDOS, "wqkv"], "model.layers.0.attention.wqkv") == "wqkv"  # the costly key matches nothing
    assert time.monotonic() - started < 10


def test_targets_are_unresolved_not_hung_on_a_costly_pattern():
    from harness.model.structure import BaseModelInfo
    from harness.model.targets import resolve_targets

    base = BaseModelInfo(base_dir=ROOT, config={}, weights={"model.layers.0.attention.wqkv.weight": ((8, 8), "float32")})
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": REDOS}
    started = time.monotonic()
    result = resolve_targets(config, base)
    assert time.monotonic() - started < 20
    assert result.error and "too costly" in result.error and result.matched == []
    result = resolve_targets({**config, "target_modules": "(unclosed"}, base)
    assert "not a valid regular expression" in result.error
    result = resolve_targets({**config, "target_modules": r".*\.wqkv"}, base)
    assert result.error is None and result.matched == ["model.layers.0.attention.wqkv"]


# -- config strings of megabytes (issue 22): one line naming the file and the field, before any check reads them ---


@pytest.mark.parametrize(
    ("config_change", "where"),
    [
        ({"target_modules": "x" * (9 * 1024 * 1024)}, "the value of target_modules"),
        ({"base_model_name_or_path": "x" * (9 * 1024 * 1024)}, "the value of base_model_name_or_path"),
        ({"rank_pattern": {"w" * (9 * 1024 * 1024): 4}}, "a key in rank_pattern"),
        ({"target_modules": ["wqkv", "y" * 200_000]}, "the value of target_modules[1]"),
    ],
)
def test_megabyte_config_strings_are_refused_naming_file_and_field(default_bundle, tmp_path, config_change, where):
    import shutil

    from harness.inputs.adapter_dir import read_adapter
    from harness.inputs.errors import InputError

    adapter = tmp_path / "adapter"
    shutil.copytree(default_bundle.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **config_change}))
    with pytest.raises(InputError) as refused:
        read_adapter(adapter)
    text = str(refused.value)
    assert "\n" not in text and len(text) < 400, text
    assert text.startswith(f"{adapter / 'adapter_config.json'}: {where} is a string of "), text
    assert "over the 100,000-character limit" in text and "save_pretrained" in text, text
    # read leniently (the static checks' mode), config-valid fails with the same sentence
    from harness.checks import CheckContext, CheckOptions
    from harness.checks.registry import get_check, run_check

    ctx = CheckContext(adapter=read_adapter(adapter, strict_config=False), options=CheckOptions())
    try:
        result = run_check(get_check("config-valid"), ctx)
    finally:
        ctx.adapter.close()
    assert result.status == "fail" and result.message == text, result.message
