# shellcheck shell=bash
# Shared set-up for scripts/*: makes sure the machine has what peerd needs, then
# exposes $ROOT, $VENV and $PY. Idempotent and quick when nothing changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PEERD_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export TF_ENABLE_ONEDNN_OPTS=0

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

ensure_debs() {
  # bubblewrap: the task sandbox (fail closed without it). dataset-fashion-mnist: the
  # demo's data, read through Keras' own loader (shared/notes/tensorflow-and-data.md).
  local need=()
  command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
  [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: ${need[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
      || say "warning: could not install ${need[*]} (tests that need them will say so)"
  else
    say "warning: missing ${need[*]}; install them with: sudo apt-get install ${need[*]}"
  fi
}

ensure_venv() {
  local stamp="$VENV/.peerd-stamp" want
  want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [ ! -x "$PY" ]; then
    say "creating virtual environment in $VENV"
    python3 -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing peerd and its dependencies (TensorFlow takes a minute the first time)"
    local log="$VENV/pip-install.log"
    if ! { "$PY" -m pip install -q -U pip && "$PY" -m pip install -q -e "$ROOT[tf,test]"; } >"$log" 2>&1; then
      tail -30 "$log" >&2
      say "pip install failed (full log: $log)"
      return 1
    fi
    echo "$want" > "$stamp"
  fi
}
