#!/usr/bin/env bash
# Mutation testing of the checks, the loading paths, the fp32 reference, the tolerance table and the load records
# (scope and tests: [tool.mutmut] in pyproject.toml). Runs mutmut in the project venv on one core by default
# and prints the score per module over the mutants it ran (all, or those matching the globs); survivors are
# listed in mutants/results.txt (or `bash scripts/in-venv mutmut results`) and shown with
# `bash scripts/in-venv mutmut show <name>`.
#
#   bash scripts/mutation-test.sh            # a fresh run: mutants/ is rebuilt (mutmut keeps stale test copies)
#   MUTMUT_MAX_CHILDREN=2 bash scripts/mutation-test.sh
#   bash scripts/mutation-test.sh 'harness.numerics.reference.*'   # only the mutants matching these globs
#   bash scripts/mutation-test.sh 'harness.checks.merged.x_check_*'  # one module's check bodies
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
in_venv=(bash "$root/scripts/in-venv")
if ! "${in_venv[@]}" python -c 'import mutmut' 2>/dev/null; then
  "${in_venv[@]}" python -m pip install --quiet --disable-pip-version-check -r "$root/requirements/mutation.txt"
fi
rm -rf "$root/mutants"
start=$(date +%s)
"${in_venv[@]}" mutmut run --max-children "${MUTMUT_MAX_CHILDREN:-1}" "$@" || true
echo "mutmut run took $(( $(date +%s) - start )) s"
"${in_venv[@]}" mutmut results --all true >mutants/results.txt 2>/dev/null
"${in_venv[@]}" python - <<'PY'
import collections
import re

# one line per mutant: "    harness.pkg.module.x_function__mutmut_3: killed"; a glob run leaves the others "not checked"
per_module = collections.defaultdict(collections.Counter)
for line in open("mutants/results.txt"):
    if m := re.match(r"\s*([\w.]+?)\.x\S*__mutmut_\d+: (.+)$", line):
        per_module[m[1]][m[2].strip()] += 1
total = collections.Counter()
for module, counts in sorted(per_module.items()):
    checked = sum(n for status, n in counts.items() if status != "not checked")
    if checked:
        total += counts
        others = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()) if status not in ("killed", "not checked"))
        print(f"{module}: {counts['killed']}/{checked} killed = {100 * counts['killed'] / checked:.1f}%"
              + (f" ({others})" if others else ""))
checked = sum(n for status, n in total.items() if status != "not checked")
if checked:
    print(f"mutation score: {total['killed']}/{checked} killed = {100 * total['killed'] / checked:.1f}% "
          f"(with timeouts as detected: {100 * (total['killed'] + total['timeout']) / checked:.1f}%)")
PY
