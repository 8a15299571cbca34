#!/usr/bin/env bash
# The full-size GPU check in one command: make sure the stack is importable, run `pytest -m gpu` on the
# synthetic XComposer family at the real 7B dims (tests/gpu/test_full_size_gpu.py), and leave in OUT_DIR:
#   junit.xml        the test results
#   figures.json     GPU model, timings, peak memory, max errors ("full_size"), plus how the run went ("gpu_check")
#   environment.txt  torch / CUDA / nvidia-smi
#   gpu-check.log    everything printed
#
#   bash scripts/gpu-check.sh OUT_DIR
#
# Environment (all optional):
#   PLORA_HARNESS_GPU_PYTHON   use this interpreter as it is: no venv, no installs
#   PLORA_HARNESS_GPU_VENV     the venv to create or reuse (default ~/.cache/plora-harness/venv-gpu), made with
#                              --system-site-packages, so a CUDA torch already on the machine is reused, and only
#                              what is missing is installed (pins from requirements/dev.txt).
#   PLORA_HARNESS_TORCH_SPEC   what to install when no CUDA build of torch is importable (default: torch==2.13.0,
#                              PyPI's Linux wheel, which is the CUDA build)
#   PLORA_HARNESS_GPU_TIMEOUT  seconds before pytest is stopped (default 900; the suite itself needs < 300)
#   PLORA_HARNESS_GPU_PYTEST   extra pytest arguments, e.g. "--plora-dtype float16"
# Exit status: pytest's; 2 usage; 3 no CUDA device; 4 the stack could not be set up.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bash scripts/gpu-check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
exec > >(tee "$out/gpu-check.log") 2>&1
started=$(date +%s)

pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }

if [[ -n "${PLORA_HARNESS_GPU_PYTHON:-}" ]]; then
  py="$PLORA_HARNESS_GPU_PYTHON"
else
  venv="${PLORA_HARNESS_GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/plora-harness/venv-gpu}"
  if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$(dirname "$venv")" && python3 -m venv --system-site-packages "$venv" || { echo "gpu-check: cannot create $venv" >&2; exit 4; }
  fi
  py="$venv/bin/python"
  if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA build of torch importable; installing ${PLORA_HARNESS_TORCH_SPEC:-torch==2.13.0}"
    pip_install "${PLORA_HARNESS_TORCH_SPEC:-torch==2.13.0}" || { echo "gpu-check: torch install failed" >&2; exit 4; }
  fi
  # The rest of the pinned stack, only what does not import already (offline machines often have it all).
  for pkg in transformers peft safetensors tokenizers filelock pytest hypothesis; do
    if ! "$py" -c "import $pkg" 2>/dev/null; then
      pin="$(grep -E "^$pkg==" "$root/requirements/dev.txt" || echo "$pkg")"
      echo "gpu-check: installing $pin"
      pip_install "$pin" || { echo "gpu-check: $pin install failed" >&2; exit 4; }
    fi
  done
fi

# The package from this checkout; its pytest plugin by name unless an installed copy registers it already.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
plugin=()
if ! "$py" -c 'import sys
from importlib.metadata import entry_points
sys.exit(0 if any(e.name == "plora_harness" for e in entry_points(group="pytest11")) else 1)' 2>/dev/null; then
  plugin=(-p harness.pytest_plugin)
fi

"$py" - >"$out/environment.txt" <<'EOF'
import platform, torch, transformers, peft
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi >>"$out/environment.txt" 2>&1
cat "$out/environment.txt"

finish() {  # finish STATUS [REASON]: record how the run went in figures.json, summarise, exit with STATUS
  "$py" - "$out/figures.json" "$1" "$(( $(date +%s) - started ))" "${2:-}" <<'EOF'
import json, sys
from pathlib import Path
from fixtures.gpu.figures import write_figures

path, rc, wall, reason = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
write_figures(path, "gpu_check", {"exit_status": rc, "wall_s_including_setup": wall, "reason": reason or None})
full = json.loads(path.read_text()).get("full_size")
if not full:
    print("gpu-check: the full-size run wrote no figures" + (f" ({reason})" if reason else " (see junit.xml)"))
    sys.exit(0)
env, t, mem = full["environment"], full["time_s"], full["peak_memory_gib"]
print(f"gpu-check: {env.get('device_name')}: {'ok' if full['ok'] else 'FAILED'}; total {t.get('total')} s "
      f"(build {t.get('build')}, merge {t.get('merge')}, check {t.get('check')}); peak {mem.get('overall')} GiB")
for problem in full["problems"]:
    print(f"gpu-check: problem: {problem}")
EOF
  echo "gpu-check: results in $out (junit.xml, figures.json, environment.txt, gpu-check.log); exit $1"
  exit "$1"
}

# PLORA_HARNESS_GPU_ALLOW_CPU=1 goes on without CUDA (the tests then skip): only to test this script itself.
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    && [[ "${PLORA_HARNESS_GPU_ALLOW_CPU:-}" != 1 ]]; then
  echo "gpu-check: no CUDA device: torch.cuda.is_available() is False with this interpreter ($py); run it on a GPU machine" >&2
  finish 3 "no CUDA device"
fi

cd "$root" || exit 4
# shellcheck disable=SC2086  # PLORA_HARNESS_GPU_PYTEST is a list of arguments
PLORA_HARNESS_FIGURES="$out/figures.json" timeout "${PLORA_HARNESS_GPU_TIMEOUT:-900}" \
  "$py" -m pytest "${plugin[@]}" -m gpu tests/gpu/test_full_size_gpu.py -p no:cacheprovider -v -rA \
  --junitxml="$out/junit.xml" ${PLORA_HARNESS_GPU_PYTEST:-}
rc=$?
finish "$rc"
