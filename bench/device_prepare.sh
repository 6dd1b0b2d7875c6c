#!/usr/bin/env bash
# Gets what bench/device_run.sh needs on a GPU machine that cannot reach any
# package index (the team's lent H100/H200 machines: Python 3.12, JAX, torch,
# transformers, cupy and nvcc installed; no fastapi, pydantic or tokamax;
# what it has: ../.library/device/KINDS.md):
#
#   bash bench/device_prepare.sh [DIR] [PEER_QWEN3_DIR]
#
# DIR (default .devrun, which this script adds to .git/info/exclude) receives
#   wheels/  the missing Python packages as cp312 manylinux wheels, without
#            their own dependencies (those are on the machine);
#   lib/     this checkout's FFI library built here with its CUDA part, which
#            device_run.sh uses when USE_CARRIED=1 instead of building there
#            (about a minute of device time; the build here must see nvcc);
#   peers/jax-llm-examples/{qwen3,LICENSE,COMMIT}: the JAX peer of
#            w1_decode_gpu.py, copied from PEER_QWEN3_DIR (the qwen3 directory
#            of a jax-llm-examples checkout) when given.
# Then, with DIR carried to the machine: `bash bench/device_run.sh PART...`.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.devrun}
mkdir -p "$DIR/wheels" "$DIR/lib" .git/info
grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude

# tokamax at the gpu extra's minimum, the version of the earlier GPU rows in
# RESULTS.md; it imports xprof at import time (its benchmarking module), and
# xprof's import needs fire and termcolor (the rest it needs is on the
# machine). Then the HTTP server's packages.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DIR/wheels" \
  "tokamax==0.0.17" einshape qwix immutabledict xprof fire termcolor \
  fastapi starlette pydantic pydantic_core annotated-types typing-inspection opentelemetry-api uvicorn

# PYTHON: one whose jaxlib holds the XLA FFI headers (this checkout's .venv).
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || command -v python3 )}
if command -v nvcc >/dev/null; then
  cmake -S . -B /tmp/eaas-device-build -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" > /tmp/eaas-device-build.log \
    && cmake --build /tmp/eaas-device-build -j"$(nproc)" >> /tmp/eaas-device-build.log \
    && cp /tmp/eaas-device-build/libeaas_ffi.so "$DIR/lib/" && echo "built $DIR/lib/libeaas_ffi.so"
else
  echo "no nvcc here: device_run.sh will build the library on the machine"
fi

if [ $# -ge 2 ]; then
  peer=$DIR/peers/jax-llm-examples
  mkdir -p "$peer"
  cp -r "$2" "$peer/qwen3"
  cp "$2/../LICENSE" "$peer/" 2>/dev/null || echo "no LICENSE beside $2: copy it to $peer yourself"
  # its commit: a COMMIT file beside it (a copy), else its checkout's HEAD
  cp "$2/../COMMIT" "$peer/" 2>/dev/null || git -C "$2" rev-parse HEAD > "$peer/COMMIT" \
    || echo "write the jax-llm-examples commit of $2 to $peer/COMMIT"
fi
du -sh "$DIR"
