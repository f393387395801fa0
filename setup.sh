#!/usr/bin/env bash
# setup.sh — one environment for DeepSpeed-Chat and trlx at their pinned commits, with our overlays.
# `bash setup.sh --help` (the text of usage() below) says how to call it. Everything is idempotent: stamps in the
# venv skip pip when nothing changed, and the overlay engine does nothing when the work trees already are pin + overlays.
set -euo pipefail

usage() {
    cat <<'HELP'
usage: bash setup.sh [--upstream-only | --for-tests] [--force]   (make setup / make upstream / make test)

  bash setup.sh                   venv + pinned deps + upstream checkouts + overlays + editable installs
  bash setup.sh --upstream-only   only git + overlays (no pip): for clusters with a prepared environment
  bash setup.sh --for-tests       like setup, but an upstream with no reachable source is skipped (its tests then
                                  report why) instead of failing
  bash setup.sh --force           (or FORCE=1) move edits found inside upstream/ to upstream/.backup/ instead of
                                  refusing

Environment:
  BASE_PYTHON      the interpreter that creates the venv (default python3; Python 3.10+)
  PYTHON           the interpreter that runs the project's modules, as everywhere in the project: here the venv's
                   ($VENV/bin/python), so leave it unset; with --upstream-only, a prepared environment's python.
                   (Before, setup read PYTHON as BASE_PYTHON: a PYTHON that is not the venv's still is, with a note.)
  VENV             the venv folder (default .venv)
  UPSTREAM_MIRROR  folder with DeepSpeedExamples(.git) and trlx(.git) for air-gapped machines
  TORCH_SPEC       what pip installs as torch (default torch==2.13.0; e.g. a CUDA build on GPU nodes, with its
                   --index-url)
  PIP_EXTRA_ARGS   more pip options for every install
  RLHF_LOCK_TIMEOUT  seconds to wait for a DeepSpeed op build another process runs (default 1800)
HELP
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

mode=full
for arg in "$@"; do
    case "$arg" in
        --upstream-only) mode=upstream ;;
        --for-tests) mode=tests ;;
        --force) export FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: setup.sh: unknown argument '$arg' — see bash setup.sh --help" >&2; exit 2 ;;
    esac
done

VENV="${VENV:-.venv}"
py="$VENV/bin/python"
BASE_PYTHON="${BASE_PYTHON:-}"
if [[ -n "${PYTHON:-}" && "$mode" != upstream && "$(realpath -ms "$PYTHON")" != "$(realpath -ms "$py")" ]]; then
    if [[ -z "$BASE_PYTHON" ]]; then
        BASE_PYTHON="$PYTHON"
        echo "note: PYTHON=$PYTHON is taken as BASE_PYTHON, the interpreter that creates $VENV; PYTHON names the" \
             "interpreter that runs the project's modules (here $py) — pass BASE_PYTHON= instead" >&2
    else
        echo "note: PYTHON=$PYTHON is ignored: setup runs the project's modules with $py (BASE_PYTHON=$BASE_PYTHON" \
             "creates it)" >&2
    fi
fi
BASE_PYTHON="${BASE_PYTHON:-python3}"
read -r -a pip_extra <<< "${PIP_EXTRA_ARGS:-}"   # word lists: split on spaces, never globbed
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU build lies on local disk here; GPU nodes may pass a CUDA build
say() { printf '[setup] %s\n' "$*"; }

ensure_venv() {
    if [[ ! -x "$py" ]]; then
        if ! "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "error: setup.sh: BASE_PYTHON=$BASE_PYTHON is missing or older than 3.10 — install Python 3.10+ or pass" \
                 "BASE_PYTHON=/path/to/python3.11" >&2
            exit 2
        fi
        say "creating $VENV with $("$BASE_PYTHON" --version 2>&1)"
        "$BASE_PYTHON" -m venv "$VENV"
    fi
    local stamp_file="$VENV/.rlhf-overlay-deps" want
    want="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-64) $TORCH_SPEC"
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" ]]; then
        return 0
    fi
    say "installing pinned dependencies into $VENV (first time: a few minutes)"
    # torch first and on its own, so nothing later resolves `torch` to a multi-GB CUDA build.
    local torch_spec; read -r -a torch_spec <<< "$TORCH_SPEC"   # may carry pip options, e.g. --index-url
    "$py" -m pip install "${pip_extra[@]}" "${torch_spec[@]}"
    "$py" -m pip install "${pip_extra[@]}" wheel setuptools
    # DS_BUILD_OPS=0: DeepSpeed JIT-builds the ops it needs at first use (cached in TORCH_EXTENSIONS_DIR);
    # --no-build-isolation: deepspeed's setup.py imports the torch installed above.
    DS_BUILD_OPS=0 "$py" -m pip install "${pip_extra[@]}" --no-build-isolation -r requirements.txt
    "$py" -m pip install "${pip_extra[@]}" --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp_file"
}

install_upstreams() {
    # `pip install -e` each folder the lock lists under `install`, once per pinned commit.
    # --no-deps: requirements.txt already pins everything both need (trlx's declared ray/wandb/tritonclient are
    # made optional by our patches). compat mode: DeepSpeed-Chat's `dschat` has no __init__.py, and the
    # default (strict, import-hook) editable mode does not expose such namespace packages.
    "$py" - <<'EOF' | while read -r name commit path; do
from rlhf_overlay.engine.lock import load_lock
from rlhf_overlay.paths import LOCK_FILE, UPSTREAM_DIR
for name, spec in load_lock(LOCK_FILE).upstreams.items():
    status = UPSTREAM_DIR / f".{name}.status"
    if status.exists() and status.read_text().strip() == "ok":
        for p in spec.install:
            print(name, spec.commit, p)
EOF
        local stamp="$VENV/.rlhf-overlay-editable-${name}-${path//\//_}"
        [[ -f "$stamp" && "$(cat "$stamp")" == "$commit" ]] && continue
        say "pip install -e upstream/$name/$path"
        "$py" -m pip install "${pip_extra[@]}" --no-deps --no-build-isolation --use-pep517 \
            --config-settings editable_mode=compat -e "upstream/$name/$path" >/dev/null
        echo "$commit" > "$stamp"
    done
}

prebuild_deepspeed_cpu_ops() {
    # On CPU, DeepSpeed JIT-compiles its CPU Adam (offload) and fused Adam (DeepSpeed-Chat without offload) at the
    # first training step (~80 s each). Do it once here, into the user cache, so training runs and tests start
    # straight away.
    local ext
    ext="${TORCH_EXTENSIONS_DIR:-${RLHF_OVERLAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-overlay}/torch_extensions}"
    # A `lock` left there by a killed build makes torch (this build, and every DeepSpeed run) wait forever:
    # stale ones are removed, a build in progress is waited for (RLHF_LOCK_TIMEOUT); see rlhf_overlay/runtime/waits.py.
    if ! "$py" -m rlhf_overlay.runtime.waits extensions "$ext"; then
        say "warning: not pre-building DeepSpeed's CPU ops (see the message above)"
        return 0
    fi
    if compgen -G "$ext/cpu_adam/cpu_adam*.so" >/dev/null && compgen -G "$ext/fused_adam/fused_adam*.so" >/dev/null; then
        return 0
    fi
    if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        return 0
    fi
    say "building DeepSpeed's CPU Adam and fused Adam once into $ext (~1-3 min)"
    TORCH_EXTENSIONS_DIR="$ext" DS_ACCELERATOR=cpu "$py" -c \
        'from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(op).load() for op in ("CPUAdamBuilder", "FusedAdamBuilder")]' \
        >/dev/null 2>&1 \
        || say "warning: could not pre-build DeepSpeed's CPU ops; DeepSpeed will try again at the first training step"
}

install_upstream_test_deps() {
    # `make upstream-tests` runs the upstreams' own test suites, which need a few test-only packages
    # (requirements-upstream-tests.txt). They go into their own folder, on PYTHONPATH only for those runs
    # (rlhf_overlay/engine/upstream_tests.py): peft, for one, changes what trlx does at import.
    local target="$VENV/upstream-tests-deps" want
    want="$(sha256sum requirements-upstream-tests.txt | cut -c1-64)"
    [[ -f "$target/.rlhf-overlay-stamp" && "$(cat "$target/.rlhf-overlay-stamp")" == "$want" ]] && return 0
    say "installing the upstream test suites' dependencies into $target"
    rm -rf "$target.tmp"
    "$py" -m pip install "${pip_extra[@]}" --no-deps --target "$target.tmp" -r requirements-upstream-tests.txt \
        >/dev/null || return 1
    echo "$want" > "$target.tmp/.rlhf-overlay-stamp"
    rm -rf "$target" && mv "$target.tmp" "$target"
}

sync_args=()
[[ "$mode" == tests ]] && sync_args+=(--best-effort)

if [[ "$mode" == upstream ]]; then
    # No pip here: PYTHON (a prepared environment's python) when given, else the venv if it exists (gitpython), else
    # BASE_PYTHON with gitpython installed.
    runner="${PYTHON:-$py}"; [[ -n "${PYTHON:-}" || -x "$runner" ]] || runner="$BASE_PYTHON"
    exec "$runner" -m rlhf_overlay.engine.setup_engine sync "${sync_args[@]}"
fi

ensure_venv
"$py" -m rlhf_overlay.engine.setup_engine sync "${sync_args[@]}"
install_upstreams
install_upstream_test_deps || say "warning: could not install requirements-upstream-tests.txt; make upstream-tests will say so"
prebuild_deepspeed_cpu_ops
[[ "$mode" == full ]] && say "ready. Next: make ppo-smoke-test (or make help)"
exit 0
