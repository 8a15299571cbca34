"""``plora-harness``: parse arguments, call ``harness.check``, print the report, set the exit code.

Exit codes: 0 no check failed (warnings allowed); 1 a check failed; 2 usage error or
an input that cannot be read at all (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_UNREADABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plora-harness",
        description="Conformance checks for LoRA adapters of XComposer (PLoRA) models and HF causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="check an adapter (default: the embedded synthetic XComposer base + adapter)",
        description="Without --adapter: build and check the embedded synthetic XComposer base + adapter.",
    )
    check.add_argument("--adapter", type=Path, help="PEFT adapter directory (or a DeepSpeed checkpoint directory)")
    check.add_argument("--base-model", type=Path, help="base model directory: adds loading and numerical checks")
    check.add_argument("--merged", type=Path, help="merged checkpoint directory to verify against base + adapter")
    check.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="dtype for the dynamic checks (default float32 on CPU, bfloat16 on CUDA)")
    check.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    check.add_argument("--json", type=Path, dest="json_path", help="write the JSON report here")
    check.add_argument("--junit", type=Path, dest="junit_path", help="write a JUnit XML report here")
    check.add_argument("--allow-plora-targets", action="store_true",
                       help="turn lora-on-plora from a failure into a warning")
    check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.api import check
    from harness.compat import UnsupportedStack
    from harness.inputs.errors import InputError

    progress = None if args.quiet else (lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    if args.adapter is None and (args.base_model or args.merged):
        print("plora-harness: --base-model/--merged need --adapter; run without arguments for the built-in demo",
              file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        report = check(
            args.adapter,
            base_model=args.base_model,
            merged=args.merged,
            dtype=args.dtype,
            device=args.device,
            allow_plora_targets=args.allow_plora_targets,
            progress=progress,
        )
    except (InputError, UnsupportedStack) as err:
        print(f"plora-harness: {err}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(report.render())
    if args.json_path:
        args.json_path.write_text(report.to_json())
    if args.junit_path:
        report.to_junit(args.junit_path)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
