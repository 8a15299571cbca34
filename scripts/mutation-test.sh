#!/usr/bin/env bash
# Mutation testing of the static checks, the fp32 reference, the tolerance table and the load records
# (scope and tests: [tool.mutmut] in pyproject.toml). Runs mutmut in the project venv on one core by default
# and prints the score; survivors are listed with `bash scripts/in-venv mutmut results` and shown with
# `bash scripts/in-venv mutmut show <name>`.
#
#   bash scripts/mutation-test.sh            # a fresh run: mutants/ is rebuilt (mutmut keeps stale test copies)
#   MUTMUT_MAX_CHILDREN=2 bash scripts/mutation-test.sh
#   bash scripts/mutation-test.sh 'harness.numerics.reference.*'   # only the mutants matching these globs
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
"${in_venv[@]}" mutmut export-cicd-stats >/dev/null
"${in_venv[@]}" python - <<'PY'
import json

s = json.load(open("mutants/mutmut-cicd-stats.json"))
print("mutants:", ", ".join(f"{k} {v}" for k, v in s.items() if k != "check_was_interrupted_by_user"))
if s["total"]:
    print(f"mutation score: {s['killed']}/{s['total']} killed = {100 * s['killed'] / s['total']:.1f}% "
          f"(with timeouts as detected: {100 * (s['killed'] + s['timeout']) / s['total']:.1f}%)")
PY
