"""Cost of saying no, and of being installed: two numbers a user of someone else's CI feels.

  fast-fail  - ``plora-harness check --adapter /no/such/dir`` in a fresh process, to its exit 2
               (target: well under 1 s; every path is validated before heavy imports);
  plugin     - ``pytest`` on an unrelated repository with one trivial test, with the package installed
               (its plugin registered through the entry point) vs ``-p no:plora_harness``
               (target: under 0.3 s more; without --plora-* options the plugin adds nothing).
Runs interleaved rounds in fresh processes and prints medians and the difference.

    python benchmarks/cli_startup.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median  # noqa: E402


def timed(command: list[str], cwd: Path | None = None, expect: int = 0) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    seconds = time.perf_counter() - start
    if run.returncode != expect:
        raise RuntimeError(f"{command} exited {run.returncode}, expected {expect}:\n{run.stdout[-2000:]}{run.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"fast-fail": [], "pytest with plugin": [], "pytest without plugin": []}
    with tempfile.TemporaryDirectory() as repo:
        repo = Path(repo)
        (repo / "pytest.ini").write_text("[pytest]\n")
        (repo / "test_unrelated.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        for _ in range(args.repeats):
            samples["fast-fail"].append(timed([sys.executable, "-m", "harness.cli", "check", "--adapter",
                                               "/no/such/dir"], expect=2))
            samples["pytest with plugin"].append(timed(pytest, cwd=repo))
            samples["pytest without plugin"].append(timed([*pytest, "-p", "no:plora_harness"], cwd=repo))
    result = {"machine": machine(), "repeats": args.repeats,
              "median_s": {name: round(median(values), 3) for name, values in samples.items()}}
    medians = result["median_s"]
    result["plugin_overhead_s"] = round(medians["pytest with plugin"] - medians["pytest without plugin"], 3)
    for name, value in medians.items():
        print(f"{name:<22} median {value:6.3f} s")
    print(f"plugin overhead: {result['plugin_overhead_s']:+.3f} s (target < 0.3 s); fast-fail "
          f"{medians['fast-fail']:.3f} s (target < 1 s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
