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
  # demo's data, read through Keras' own loader (docs/design.md appendix B.3).
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
    if ! { "$PY" -m pip install -q -U pip && "$PY" -m pip install -q -e "$ROOT[tf,jax,test]"; } >"$log" 2>&1; then
      tail -30 "$log" >&2
      say "pip install failed (full log: $log)"
      return 1
    fi
    echo "$want" > "$stamp"
  fi
}

ensure_interop_js() {
  # The js-libp2p peer of tests/integration/test_interop_js.py (a second libp2p
  # implementation; versions pinned in tests/interop/js/package-lock.json). Node.js >= 18:
  # tests/interop/js/polyfill.mjs fills in what 18 lacks. On failure this only warns: the
  # interop tests then FAIL and say how to install it (they never skip).
  local dir="$ROOT/tests/interop/js" stamp want log
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing Debian packages: nodejs npm"
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null 2>&1 \
        || say "warning: could not install nodejs npm (the interop tests will fail and say so)"
    else
      say "warning: missing node/npm; install them with: sudo apt-get install nodejs npm"
    fi
  fi
  command -v npm >/dev/null 2>&1 || return 0
  stamp="$dir/node_modules/.peerd-stamp" # npm ci empties node_modules, stamp included
  want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  say "installing the js-libp2p interop peer (npm ci)"
  log=$(mktemp)
  if (cd "$dir" && npm ci --no-audit --no-fund) >"$log" 2>&1; then
    echo "$want" > "$stamp"
  else
    tail -30 "$log" >&2
    say "warning: npm ci in $dir failed (the interop tests will fail and say so)"
  fi
  rm -f "$log"
}
