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


GROUPS = {"inputs": "inputs", "run": "what to run", "output": "output"}
FALLBACKS = ("An option not given falls back to its variable PLORA_HARNESS_<NAME> (e.g. PLORA_HARNESS_BASE_MODEL; "
             "lists separated by ':' for paths, ',' for ids), then to [tool.plora-harness] in the nearest "
             "pyproject.toml, then to its default.")


def _add_options(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """The options of ``harness.options`` in these groups, as the command line writes them. Every value stays
    text here (absent options stay absent): ``harness.settings.resolve`` parses it, then falls back to the
    environment, ``[tool.plora-harness]`` and the default, exactly as the plugin does."""
    from harness.options import FLAG, OPTIONS

    sections = {g: parser.add_argument_group(GROUPS[g]) for g in groups}
    for option in OPTIONS:
        if not option.cli or option.group not in groups:
            continue
        kwargs: dict = {"dest": option.name, "default": argparse.SUPPRESS, "help": option.help}
        if option.kind == FLAG:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(action="append" if option.repeatable else "store", metavar=option.metavar)
            if option.choices:
                kwargs.update(choices=option.choices, metavar=None)
        sections[option.group].add_argument(option.flag, **kwargs)


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
        epilog=FALLBACKS,
    )
    _add_options(check, ("inputs", "run", "output"))
    demo = sub.add_parser(
        "demo", help="build and check the built-in synthetic XComposer base, adapter and merged model",
        description="Build (or reuse from the cache) the built-in synthetic XComposer base model, a trained adapter "
        "and its merged checkpoint, and run every check on them. The report's first line says it is the demo.")
    _add_options(demo, ("run", "output"))
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
    given = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "demo":
        given["demo"] = True
    with _terminated_as_interrupt():
        return _check(given)


@contextlib.contextmanager
def _terminated_as_interrupt():
    """A CI runner that cancels a job sends SIGTERM: treat it as Ctrl-C, so the engine child is stopped and its
    temporary files (depth slices, saved merges: gigabytes at 7B) are removed, instead of dying mid-write."""
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # someone else's process: leave it be
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


def _check(given: dict) -> int:
    from harness.api import check_adapters
    from harness.compat import UnsupportedStack
    from harness.inputs.errors import InputError
    from harness.settings import find_pyproject, resolve

    quiet = verbose = False
    try:
        # the demo reads its own inputs: no variable or [tool.plora-harness] of the user's
        demo = bool(given.get("demo"))
        options = resolve("cli", given, pyproject=None if demo else find_pyproject(), fallbacks=not demo).values
        quiet, verbose = options.pop("quiet"), options.pop("verbose")
        json_path, junit_path = options.pop("json"), options.pop("junit")
        _require_writable(json_path if json_path != "-" else None, "--json")
        _require_writable(junit_path, "--junit")
        adapters, base_model, merged = options.pop("adapter"), options.pop("base_model"), options.pop("merged")
        if release := options.pop("release"):  # harness.inputs.release: the pairs as --adapter A=M values
            from harness.inputs.release import as_adapter_args, read_release

            adapters = [*(adapters or []), *as_adapter_args(read_release(release))]
        # stdout carries the report only: whatever a library prints while the run imports or builds (DeepSpeed's
        # accelerator banner when the built-in demo is built in this process) goes to stderr, and loggers that
        # bind sys.stdout at import bind stderr
        with _progress(quiet) as progress, contextlib.redirect_stdout(sys.stderr):
            run = check_adapters(adapters, base_model, merged, **options, progress=progress, verbose=verbose)
    except (InputError, UnsupportedStack) as err:
        from harness.report import printable

        print(f"{PROG}: {printable(' '.join(str(err).split()), 1000)}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no report", file=sys.stderr)
        return EXIT_INTERRUPTED
    single = len(run.reports) == 1
    result = run.reports[0] if single else run
    text = result.render(verbose=verbose)
    if json_path == "-":
        _write(result.to_json())
        if not quiet:
            print(text, file=sys.stderr)
    else:
        _write(text + "\n")
        if json_path:
            Path(json_path).write_text(result.to_json())
    if junit_path:
        result.to_junit(junit_path)
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

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet
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
