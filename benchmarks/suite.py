"""Wall time of the default test run (``pytest -n auto``) and the number of property examples executed.

    python benchmarks/suite.py [--json out.json] [extra pytest args]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROPERTY_FILES = ["tests/test_properties_merge.py", "tests/test_paths.py", "tests/test_reference.py",
                  "tests/test_synthetic_plora.py"]


def main() -> None:
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        index = args.index("--json")
        json_path = Path(args[index + 1])
        del args[index : index + 2]
    command = [sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics", *args]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    out = run.stdout
    # xdist workers do not print hypothesis statistics: count examples in a separate serial run
    # of the property-based files (not timed as part of the suite).
    stats = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            "--hypothesis-show-statistics", "-m", "not distributed", *PROPERTY_FILES],
                           cwd=ROOT, capture_output=True, text=True)
    examples = sum(int(n) for n in re.findall(r"(\d+) passing(?: examples)?,", stats.stdout))
    tail = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    result = {"machine": machine(), "wall_s": round(wall, 1), "exit_code": run.returncode,
              "property_examples": examples, "summary": tail[-1] if tail else None}
    print(f"pytest -n auto: {wall:.1f} s wall, exit {run.returncode}; {examples} hypothesis examples; "
          f"{result['summary']}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
