#!/usr/bin/env bash
# Downloads, here, the wheels the lent GPU machine lacks, into a folder that travels with the checkout
# (ignored by git; the device tool carries it: `carry: ["gpu_wheels"]`). bench/gpu_run.sh installs them there.
#
# The lent machine (last seen: Python 3.12, torch 2.11, transformers 5.17, triton, cupy) has no scipy,
# platformdirs or pytest, and downloads nothing. Carried: scipy (RIA's and the learned permutations'
# assignments), platformdirs (permsparse's cache folder), pytest and what it needs (the `tests` part).
# numpy is not carried: the machine's own (transformers needs it) serves scipy.
#
#   bash bench/gpu_prepare.sh [FOLDER]     FOLDER defaults to gpu_wheels/ at the checkout's root
#   PYTHON=path/to/python bash bench/gpu_prepare.sh FOLDER   wheels for that Python's version instead of 3.12
#                                          (the CPU rehearsal, `make rehearse`, uses its own venv's)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/gpu_wheels}"
LIMIT_MIB=60
# Exact releases: what the rehearsal installs is what the lent machine installs.
SCIPY="scipy==1.17.1"
TOOLS=("pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "pygments==2.21.0" "packaging==26.4" "platformdirs==4.14.9")

if [[ -n "${PYTHON:-}" ]]; then
  VERSION="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
else
  VERSION=3.12
fi
PIP=("${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps
     --python-version "$VERSION" --implementation cp --platform manylinux_2_28_x86_64
     --platform manylinux2014_x86_64 -d "$DEST")
mkdir -p "$DEST"
# --no-deps with the whole list named: nothing the machine already has (numpy) comes along
"${PIP[@]}" "$SCIPY" "${TOOLS[@]}"
# pytest's other requirements are for Pythons before 3.11 (exceptiongroup, tomli): name them there
if [[ "$VERSION" == 3.10 ]]; then "${PIP[@]}" exceptiongroup tomli; fi

TOTAL=$(du -sm "$DEST" | cut -f1)
COUNT=$(ls "$DEST"/*.whl | wc -l)
echo "gpu_prepare: $COUNT wheels for Python $VERSION in $DEST, ${TOTAL} MiB"
if (( TOTAL >= LIMIT_MIB )); then
  echo "gpu_prepare: the wheels take ${TOTAL} MiB, over the ${LIMIT_MIB} MiB the checkout can carry beside itself" >&2
  exit 1
fi
