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


def build_parser() -> argparse.ArgumentParser:
    from harness import __version__
    from harness.engine.plan import DEFAULT_TIMEOUT_S
    from harness.model.quantization import TRAINED_ON_CHOICES

    parser = argparse.ArgumentParser(
        prog="plora-harness",
        description="Conformance checks for LoRA adapters of XComposer (PLoRA) models and HF causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"plora-harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="check adapters (default: the built-in synthetic XComposer base + adapter)",
        description="Without --adapter: build and check the built-in synthetic XComposer base, adapter and merged "
        "model. Exit 0: every planned check ran and none failed; 1: a check failed; 2: unusable input.",
    )
    inputs = check.add_argument_group("inputs")
    inputs.add_argument("--adapter", type=Path, action="append", dest="adapters", metavar="DIR",
                        help="PEFT adapter directory (or DeepSpeed checkpoint directory); repeat to check several "
                        "adapters against one base")
    inputs.add_argument("--base-model", type=Path, metavar="DIR",
                        help="base model directory: adds the loading and numerical checks")
    inputs.add_argument("--merged", type=Path, metavar="DIR",
                        help="merged checkpoint directory to verify against base + adapter (needs --base-model)")
    inputs.add_argument("--trust-remote-code", action="store_true",
                        help="allow the base/merged directory's own Python code (auto_map) to run, in a child "
                        "process; the report lists each file with its sha256")
    run = check.add_argument_group("what to run")
    run.add_argument("--only", action="append", default=[], metavar="ID",
                     help="run only this check id (repeatable; `plora-harness list` shows the ids)")
    run.add_argument("--skip", action="append", default=[], metavar="ID", help="do not run this check id (repeatable)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="dtype for the dynamic checks (default float32 on CPU, bfloat16 on CUDA)")
    run.add_argument("--trained-on-quantized", choices=TRAINED_ON_CHOICES, default=None,
                     help="the adapter was trained on the base quantized this way (QLoRA): measure qlora-merge-gap")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for the dynamic checks")
    run.add_argument("--allow-plora-targets", action="store_true",
                     help="turn lora-on-plora from a failure into a warning")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help=f"limit per adapter for the engine process (default {DEFAULT_TIMEOUT_S:g}); checks it did "
                     "not finish fail")
    output = check.add_argument_group("output")
    output.add_argument("--json", dest="json_path", metavar="PATH",
                        help="write the JSON report here ('-' for stdout, then the table goes to stderr)")
    output.add_argument("--junit", type=Path, dest="junit_path", metavar="PATH", help="write a JUnit XML report here")
    output.add_argument("--quiet", action="store_true", help="no progress on stderr")
    output.add_argument("--verbose", action="store_true",
                        help="details of every check, and the engine's own output on stderr")
    sub.add_parser("list", help="list the check ids, their groups and what each catches",
                   description="Every check id with its group and what it catches, one line each.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list_checks()
    return _check(args)


def _list_checks() -> int:
    from harness.checks.registry import checks

    every = checks()
    width = max(len(c.id) for c in every)
    group_width = max(len(c.group) for c in every)
    for c in every:
        print(f"{c.id:<{width}}  {c.group:<{group_width}}  {c.summary}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from harness.api import check_adapters
    from harness.compat import UnsupportedStack
    from harness.inputs.errors import InputError

    try:
        _require_writable(args.json_path if args.json_path != "-" else None, "--json")
        _require_writable(args.junit_path, "--junit")
        # stdout carries the report only: whatever a library prints while the run imports or builds (DeepSpeed's
        # accelerator banner when the built-in demo is built in this process) goes to stderr, and loggers that
        # bind sys.stdout at import bind stderr
        with _progress(args) as progress, contextlib.redirect_stdout(sys.stderr):
            run = check_adapters(args.adapters, args.base_model, args.merged, dtype=args.dtype, device=args.device,
                                 allow_plora_targets=args.allow_plora_targets, trust_remote_code=args.trust_remote_code,
                                 only=args.only, skip=args.skip, timeout=args.timeout, progress=progress,
                                 verbose=args.verbose, trained_on_quantized=args.trained_on_quantized)
    except (InputError, UnsupportedStack) as err:
        from harness.report import printable

        print(f"plora-harness: {printable(' '.join(str(err).split()), 1000)}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("plora-harness: interrupted; no report", file=sys.stderr)
        return EXIT_INTERRUPTED
    single = len(run.reports) == 1
    result = run.reports[0] if single else run
    text = result.render(verbose=args.verbose)
    if args.json_path == "-":
        sys.stdout.write(result.to_json())
        if not args.quiet:
            print(text, file=sys.stderr)
    else:
        print(text)
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
