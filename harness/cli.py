"""``plora-harness``: parse arguments, validate them cheaply, run the engine in a child, print the report.

Exit codes: 0 every planned check ran and none failed (warnings allowed); 1 a check failed (or did
not finish); 2 usage error, or an input that cannot be used at all (one line on stderr, never a
traceback). stdout carries the report only (or the JSON with ``--json -``); progress and everything
the libraries print go to stderr or the engine's log.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
EXIT_INTERRUPTED = 130
PROG = "plora-harness"


class _Parser(argparse.ArgumentParser):
    """argparse answering a usage error in one line on stderr (exit 2), with a "did you mean" for a misspelt
    option (``--adaptor``) taken from every option the command knows."""

    def error(self, message: str):
        import difflib
        import re

        known = sorted({o for a in _all_actions(self) for o in a.option_strings if o.startswith("--")})
        hints = []
        for word in re.findall(r"(--?[\w-]+)", message) if "unrecognized arguments" in message else []:
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            if close and close[0] != word:
                hints.append(f"{word}: did you mean {close[0]}?")
        text = " ".join(message.split()) + (f" ({'; '.join(hints)})" if hints else "")
        self.exit(EXIT_UNUSABLE, f"{PROG}: {text}; see `{self.prog} --help`\n")


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def _timeout(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 'auto' or 'none'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _run_options(parser: argparse.ArgumentParser) -> None:
    """The options of every run, the demo's included: what to run and where the report goes."""
    from harness.model.quantization import TRAINED_ON_CHOICES

    run = parser.add_argument_group("what to run")
    run.add_argument("--only", action="append", default=None, metavar="ID",
                     help="run only this check id (repeatable; `plora-harness list` shows the ids)")
    run.add_argument("--skip", action="append", default=None, metavar="ID",
                     help="do not run this check id (repeatable)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="dtype for the dynamic checks (default: the dtype the checkpoint is stored in)")
    run.add_argument("--trained-on-quantized", choices=TRAINED_ON_CHOICES, default=None,
                     help="the adapter was trained on the base quantized this way (QLoRA): measure qlora-merge-gap")
    run.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="device for the dynamic checks (default cpu)")
    run.add_argument("--allow-plora-targets", action="store_true", default=None,
                     help="turn lora-on-plora from a failure into a warning")
    run.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory the dynamic checks may use, e.g. 8GiB (default: the RAM or GPU memory available); "
                     "a base that does not fit is checked on depth slices of its layers")
    run.add_argument("--timeout", type=_timeout, default=None, metavar="SECONDS",
                     help="limit per adapter for the engine process (default 'auto': 10 minutes plus 15 minutes per "
                     "GiB of model weights; 'none': no limit); checks it did not finish fail")
    output = parser.add_argument_group("output")
    output.add_argument("--json", dest="json_path", metavar="PATH",
                        help="write the JSON report here ('-' for stdout, then the table goes to stderr)")
    output.add_argument("--junit", dest="junit_path", metavar="PATH", help="write a JUnit XML report here")
    output.add_argument("--quiet", action="store_true", help="no progress on stderr")
    output.add_argument("--verbose", action="store_true",
                        help="details of every check, and the engine's own output on stderr")


def build_parser() -> argparse.ArgumentParser:
    from harness import __version__

    parser = _Parser(
        prog=PROG,
        description="Conformance checks for LoRA adapters of any Hugging Face causal LM (XComposer's PLoRA included).",
    )
    parser.add_argument("--version", action="version", version=f"plora-harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="check your adapters (--adapter DIR, repeatable; or [tool.plora-harness] in pyproject.toml)",
        description="Check adapters against their base model and merged checkpoints. Without --adapter (and no "
        "[tool.plora-harness] adapter) it is a usage error; `plora-harness demo` checks the built-in demo. "
        "Exit 0: every planned check ran and none failed; 1: a check failed; 2: unusable input.",
    )
    inputs = check.add_argument_group("inputs")
    inputs.add_argument("--adapter", action="append", dest="adapters", metavar="DIR[=MERGED]",
                        help="PEFT adapter directory (or DeepSpeed checkpoint directory, or a folder of adapters); "
                        "repeat to check several adapters against one base; DIR=MERGED pairs it with its merged "
                        "checkpoint")
    inputs.add_argument("--release", metavar="FILE",
                        help="a release manifest (JSON or TOML): its adapters, each with its merged checkpoint "
                        '(e.g. {"release": [{"adapter": "A", "merged": "MA"}]}); checked with any --adapter given')
    inputs.add_argument("--base-model", metavar="DIR",
                        help="base model directory: adds the loading and numerical checks")
    inputs.add_argument("--merged", action="append", metavar="DIR",
                        help="merged checkpoint to verify against base + adapter (needs --base-model); repeat it, "
                        "one per --adapter in the same order")
    inputs.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the base model's own Python code (auto_map) to run, in a child process; the "
                        "report lists each file with its sha256")
    inputs.add_argument("--demo", action="store_true",
                        help="check the built-in synthetic demo instead (the same as `plora-harness demo`)")
    _run_options(check)
    demo = sub.add_parser(
        "demo", help="build and check the built-in synthetic XComposer base, adapter and merged model",
        description="Build (or reuse from the cache) the built-in synthetic XComposer base model, a trained adapter "
        "and its merged checkpoint, and run every check on them. The report's first line says it is the demo.")
    _run_options(demo)
    sub.add_parser("list", help="list the check ids, their groups and what each catches",
                   description="Every check id with its group and what it catches, one line each.")
    explain = sub.add_parser("explain", help="what a check catches, why it matters and how to fix it",
                             description="What a check catches, why it matters and how to fix it.")
    explain.add_argument("check_id", metavar="ID", help="a check id (`plora-harness list` shows them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list_checks()
    if args.command == "explain":
        return _explain(args.check_id)
    if args.command == "demo":
        args.demo, args.adapters, args.base_model, args.merged, args.trust_remote_code = True, None, None, None, None
    return _check(args)


def _write(text: str) -> None:
    """Write to stdout; a reader that went away (``plora-harness list | head -1``) ends the output quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        import os

        # the interpreter flushes stdout again at exit: point it at /dev/null so that flush cannot fail either
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _list_checks() -> int:
    from harness.checks.registry import checks

    every = checks()
    width = max(len(c.id) for c in every)
    group_width = max(len(c.group) for c in every)
    _write("".join(f"{c.id:<{width}}  {c.group:<{group_width}}  {c.summary}\n" for c in every))
    return EXIT_OK


def _explain(check_id: str) -> int:
    import difflib
    import textwrap

    from harness.checks.registry import REGISTRY, checks

    every = {c.id: c for c in checks()}
    found = every.get(check_id) or REGISTRY.get(check_id)
    if found is None:
        close = difflib.get_close_matches(check_id, every, n=1)
        hint = f"did you mean {close[0]}?" if close else "`plora-harness list` shows them all"
        print(f"{PROG}: no check {check_id!r}; {hint}", file=sys.stderr)
        return EXIT_UNUSABLE
    parts = [f"{found.id} ({found.group})"]
    for label, text in (("catches", found.summary), ("why", found.why), ("fix", found.fix)):
        if text:
            parts.append(textwrap.fill(text, 100, initial_indent=f"{label + ':':<9}", subsequent_indent=" " * 9))
    _write("\n".join(parts) + "\n")
    return EXIT_OK


def _with_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left out from ``[tool.plora-harness]`` (not for the demo), then the defaults."""
    from harness.settings import find_pyproject, load_settings

    if not args.demo:
        for dest, value in load_settings(find_pyproject()).items():
            if getattr(args, dest, None) in (None, []):
                setattr(args, dest, value)
    defaults = {"only": [], "skip": [], "device": "cpu", "allow_plora_targets": False, "trust_remote_code": False,
                "timeout": "auto"}
    for dest, value in defaults.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    return args


def _check(args: argparse.Namespace) -> int:
    from harness.api import check_adapters
    from harness.compat import UnsupportedStack
    from harness.inputs.errors import InputError

    try:
        if getattr(args, "release", None):  # harness.inputs.release: the pairs as --adapter A=M values
            from harness.inputs.release import as_adapter_args, read_release

            args.adapters = [*(args.adapters or []), *as_adapter_args(read_release(args.release))]
        args = _with_settings(args)
        _require_writable(args.json_path if args.json_path != "-" else None, "--json")
        _require_writable(args.junit_path, "--junit")
        # stdout carries the report only: whatever a library prints while the run imports or builds (DeepSpeed's
        # accelerator banner when the built-in demo is built in this process) goes to stderr, and loggers that
        # bind sys.stdout at import bind stderr
        with _progress(args) as progress, contextlib.redirect_stdout(sys.stderr):
            run = check_adapters(args.adapters, args.base_model, args.merged, dtype=args.dtype, device=args.device,
                                 allow_plora_targets=args.allow_plora_targets, trust_remote_code=args.trust_remote_code,
                                 only=args.only, skip=args.skip, timeout=args.timeout, demo=args.demo,
                                 max_memory=args.max_memory,
                                 trained_on_quantized=args.trained_on_quantized,
                                 progress=progress, verbose=args.verbose)
    except (InputError, UnsupportedStack) as err:
        from harness.report import printable

        print(f"{PROG}: {printable(' '.join(str(err).split()), 1000)}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no report", file=sys.stderr)
        return EXIT_INTERRUPTED
    single = len(run.reports) == 1
    result = run.reports[0] if single else run
    text = result.render(verbose=args.verbose)
    if args.json_path == "-":
        _write(result.to_json())
        if not args.quiet:
            print(text, file=sys.stderr)
    else:
        _write(text + "\n")
        if args.json_path:
            Path(args.json_path).write_text(result.to_json())
    if args.junit_path:
        result.to_junit(args.junit_path)
    return run.exit_code


def _require_writable(path, flag: str) -> None:
    """Fail before the run, not after it, when a report cannot be written where asked."""
    from harness.inputs.errors import InputError

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {flag} names a directory; give a file path")
    if not path.parent.is_dir():
        raise InputError(f"{path}: {flag}'s directory {path.parent} does not exist; create it first")


class _progress:
    """Progress on stderr: a live line with the running step and elapsed time on a terminal (rich), plain
    time-stamped lines in CI logs, nothing with --quiet."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not args.quiet
        self.status = None

    def __enter__(self):
        if not self.enabled:
            return None
        import time

        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.started = time.monotonic()
        self.clock = time.monotonic
        if self.console.is_terminal:
            self.status = self.console.status("starting", spinner="dots")
            self.status.start()
        return self.update

    def update(self, text: str) -> None:
        from rich.text import Text

        from harness.report import printable

        elapsed = self.clock() - self.started
        line = f"[{elapsed:6.1f}s] {printable(text, 200)}"
        if self.status is not None:
            self.status.update(Text(line))
        else:
            self.console.print(f"... {line}", markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.stop()


if __name__ == "__main__":
    sys.exit(main())
