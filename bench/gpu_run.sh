#!/usr/bin/env bash
# The one command on a lent GPU machine: bash bench/gpu_run.sh [all|check|speed]
#
# There: Python 3.12, torch 2.11 (CUDA), transformers 5.17, triton, cupy; no scipy, platformdirs or pytest, and
# nothing can be downloaded. The checkout travels with the wheels bench/gpu_prepare.sh put in gpu_wheels/
# (device tool: `carry: ["gpu_wheels"]`) and runs from PYTHONPATH, not installed. In order:
#   1. permsparse and both scripts' modules import with the machine's own packages (nothing carried yet);
#   2. the carried wheels are installed into a temporary folder (pip --no-index --no-deps --target; without
#      pip, unpacked: a wheel is a zip) put on PYTHONPATH;
#   3. bench/gpu_check.py (about 8 min), then bench/gpu_speed.py (about 6 min), each stopped at its time limit
#      (CHECK_LIMIT, SPEED_LIMIT seconds); both write their JSON as they go, so a stopped one keeps what it had;
#   4. one table of both.
# `check` or `speed` runs only that script: a command of the device tool may run 10 minutes at most, so run
# `bash bench/gpu_run.sh check`, then `bash bench/gpu_run.sh speed`. JSON files go to $OUT (the device tool's
# folder that comes back), else bench/results/. The exit status is 1 when a step failed.
#
# --rehearse: the CPU rehearsal (`make rehearse`): the same steps with `--device cpu --dry-run` (tiny shapes,
# every part's code path), then the deploy, placement, memory, resume, gpu and rehearsal tests with the carried
# pytest. PYTHON, WHEELS and OUT name the interpreter, the wheels' folder and the JSON folder.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MODE=all
REHEARSE=0
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    all|check|speed) MODE="$arg" ;;
    *) echo "usage: bash bench/gpu_run.sh [all|check|speed] [--rehearse]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/gpu_wheels}"
OUTDIR="${OUT:-$ROOT/bench/results}"
CHECK_LIMIT="${CHECK_LIMIT:-570}"
SPEED_LIMIT="${SPEED_LIMIT:-420}"
SITE="$(mktemp -d)/site"
export HF_HUB_OFFLINE=1
mkdir -p "$OUTDIR"
failed=()
began=$SECONDS

echo "== $("$PY" -c 'import platform, torch, transformers, numpy; print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}")')"

# 1. Nothing carried yet: what the machine has must import permsparse and the scripts' modules
if PYTHONPATH="$ROOT" "$PY" -c "import permsparse, permsparse.cli, permsparse.deploy.speed, permsparse.run.placement"; then
  echo "== permsparse imports with this machine's own packages"
else
  echo "== permsparse does not import with this machine's own packages (above)" >&2
  failed+=("import")
fi

# 2. The carried wheels
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} == 0 )); then
  echo "== no wheels in $WHEELS: run bench/gpu_prepare.sh where a package index is reachable, and carry the folder" >&2
  exit 1
fi
if "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" "${wheels[@]}" \
    || { echo "== installing the carried wheels failed" >&2; exit 1; }
else  # no pip: a wheel is a zip of the files to put on the path (its .data/purelib and platlib too)
  "$PY" - "$SITE" "${wheels[@]}" <<'EOF' || { echo "== unpacking the carried wheels failed" >&2; exit 1; }
import shutil, sys, zipfile
from pathlib import Path
site = Path(sys.argv[1])
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(site)
for data in site.glob("*.data"):
    for kind in ("purelib", "platlib"):
        if (data / kind).is_dir():
            shutil.copytree(data / kind, site, dirs_exist_ok=True)
    shutil.rmtree(data)
EOF
fi
echo "== installed ${#wheels[@]} carried wheels into $SITE"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 3. The scripts (and, rehearsing, the tests)
FLAGS=()
if (( REHEARSE )); then FLAGS=(--device cpu --dry-run); fi
if [[ "$MODE" != speed ]]; then
  echo "== bench/gpu_check.py ${FLAGS[*]} (limit ${CHECK_LIMIT} s)"
  timeout -k 10 "$CHECK_LIMIT" "$PY" bench/gpu_check.py "${FLAGS[@]}" --out "$OUTDIR/gpu_check.json" || failed+=("gpu_check")
fi
if [[ "$MODE" != check ]]; then
  echo "== bench/gpu_speed.py ${FLAGS[*]} (limit ${SPEED_LIMIT} s)"
  timeout -k 10 "$SPEED_LIMIT" "$PY" bench/gpu_speed.py "${FLAGS[@]}" --out "$OUTDIR/gpu_speed.json" || failed+=("gpu_speed")
fi
if (( REHEARSE )); then
  echo "== tests with the carried pytest"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_deploy.py tests/test_placement.py tests/test_memory.py \
    tests/test_resume.py tests/test_gpu.py tests/test_rehearsal.py || failed+=("tests")
fi

# 4. One table of both
"$PY" - "$OUTDIR" "$MODE" <<'EOF'
import json, sys
from pathlib import Path
folder, mode = Path(sys.argv[1]), sys.argv[2]
print("\n| script | part or run | result | s | notes |\n|---|---|---|---|---|")
check, speed = folder / "gpu_check.json", folder / "gpu_speed.json"
if mode != "speed" and check.exists():
    for name, part in json.loads(check.read_text())["parts"].items():
        if "result" not in part:
            print(f"| gpu_check | {name} | failed | {part.get('wall_s', 0):.0f} | {part['error'][:100]} |")
            continue
        r = part["result"]
        note = r.get("summary") or ("projected: " + f"{r['projected']['seconds'] / 60:.1f} min, {r['projected']['peak_gb']:.0f} GB"
                                    if "projected" in r else ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", r).items()
                                                                       if isinstance(v, (int, float))))
        print(f"| gpu_check | {name} | {'stopped' if 'error' in part else 'ok'} | {part['wall_s']:.0f} | {note[:160]} |")
if mode != "check" and speed.exists():
    data = json.loads(speed.read_text())
    for run, r in data["runs"].items():
        if "error" in r:
            print(f"| gpu_speed | {run} | failed | – | {r['error'][:100]} |")
            continue
        if "rows" in r and "best" not in r:  # the quantized run: one row per kind and token count
            note = ", ".join(f"{x['kind']} {x['tokens']} x{x['speedup']:.2f}" for x in r["rows"])
        elif "rows" in r:
            best = [x for x in r["rows"] if x["candidate"] == r["best"] and "speedup" in x]
            note = f"best {r['best']}: " + ", ".join(f"{x['shape']} x{x['speedup']:.2f}" for x in best)
        else:
            note = ", ".join(f"{k} {v:.1e}" for k, v in r["logit_error"].items())
        print(f"| gpu_speed | {run} | ok | {r['seconds']:.0f} | {note[:160]} |")
    print("\n" + "\n".join(data["targets"]))
EOF
echo "== $(( SECONDS - began )) s; JSON in $OUTDIR"
if (( ${#failed[@]} )); then
  echo "== failed: ${failed[*]}" >&2
  exit 1
fi
