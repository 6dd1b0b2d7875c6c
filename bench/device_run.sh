#!/usr/bin/env bash
# The GPU measurements still owed to bench/RESULTS.md, in parts that fit a
# lent device call (10 minutes at most). Run from the checkout's root on the
# GPU machine, with DIR (bench/device_prepare.sh's output) carried along:
#
#   [DIR=.devrun] [LIMIT=580] [USE_CARRIED=1] [MPS=1] bash bench/device_run.sh PART...
#
# Parts (each logs to PART.log, in back.tar.gz; the W1 checkpoint is made once per
# machine, in /tmp):
#   ibgda_tests  tests/test_ibgda_gpu.py
#   gpu_tests    the tests that compile for the GPU: the expert kernels, the one-row projection, the
#                cache write, the router's top k, the decode prologue (tests/test_expert_matvec.py,
#                tests/test_moe.py, tests/test_layers.py, tests/test_cache_write.py,
#                tests/test_router_top_k.py, tests/test_decode_prologue.py; GPU_TESTS: some of them)
#   ibgda_bench  bench/ibgda_gpu.py: round trips and the W1 step, ibgda vs cuda_ipc
#   serve        bench/serve_load.py on W1: embedded vs cuda_ipc expert servers (RATE, REQS, WARM_REQS); a
#                setting finished by a cut call on the still-warm machine is not run again
#   disagg_profile  bench/disaggregated_profile.py: W1's step at batch 64, embedded vs client + expert server
#                (cuda_ipc, one GPU: use MPS=1), each profiled
#   forms        bench/expert_projection_forms.py at W1's two projection shapes
#   dense_forms  the same for W1's query and output projections (one "expert") at 1-16 rows
#   paths        bench/routed_experts_paths.py at W1's shapes
#   plans        bench/expert_matvec_plans.py at W1's gate/up (two banks) and down projections
#   dispatch     bench/dispatch_host_arrays.py: a jitted call's dispatch with a host array against none,
#                with JAX's default GPU client and with its TFRT one
#   attn_parts   bench/paged_attention_partitions.py: the paged decode kernel's partitions at W1's shapes
#   w1           bench/w1_decode_gpu.py with the JAX peer (BATCHES; W1FLAGS, default: one-token steps
#                compared, batches 1 and 256 profiled; the profiled programs' optimized HLO comes back
#                in the raw phases' hlo/)
#   parity       bench/arch_parity.py (ARCHS: some architectures, comma-separated; default all); the
#                architectures a cut call finished on the still-warm machine are not run again
# LIMIT is the call's time in seconds: each part gets what is left, and the
# W1 runs keep their finished phases in /tmp/raw/COMMIT, so the same part in a next
# call on the still-warm machine resumes. What comes back under $OUT:
# RESULTS.new.md (what the parts appended to bench/RESULTS.md; paste it there)
# and back.tar.gz (the logs, the results files and raw phases: see finish()).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
LIMIT=${LIMIT:-580}
DIR=${DIR:-.devrun}
left() { echo $(( LIMIT - ($(date +%s) - T0) - 15 )); }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/device-out}
# A copied tree has no .git: the commit to record, written before the call
# (`git rev-parse --short HEAD > DIR/commit`).
COMMIT=$(cat "$DIR/commit" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
export BENCH_COMMIT=$COMMIT  # (bench/_results.py's git_commit: a copied tree's .git may be stale)
W1=/tmp/w1-qwen3-moe-8l
RAW=/tmp/raw/$COMMIT  # finished W1 phases of this commit (for --resume), and serve_load's requests
mkdir -p "$OUT" "$RAW"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$DIR"/wheels/*.whl || { echo "installing $DIR/wheels failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench
python3 -c "import tokamax, fastapi, jax; print('jax', jax.__version__, jax.devices()[0].device_kind)" 2>&1 | tail -1
cp bench/RESULTS.md /tmp/RESULTS.before  # (also the mark the results written after it are newer than)

# MPS=1: client and server processes on the one GPU run side by side under
# an MPS daemon started for this call (and stopped at its end), instead of
# taking turns in the driver's time slices (which then bound every exchange).
# A daemon is started unless one runs; the pipe directory of one that is
# gone is removed first (its control pipe would still count as a daemon).
MPS_STARTED=
if [ -n "${MPS:-}" ] && ! pgrep -f "^nvidia-cuda-mps-control" > /dev/null; then
  rm -rf /tmp/nvidia-mps
  mkdir -p /tmp/nvidia-mps /tmp/nvidia-mps-log
  CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log nvidia-cuda-mps-control -d \
    && MPS_STARTED=1 && echo "started an MPS daemon" || echo "could not start an MPS daemon: time-sliced"
fi

# What comes back: RESULTS.new.md, and back.tar.gz with the logs, the files
# of bench/results this call wrote, and the raw phases (a call returns at most
# 8 files, so they travel as one archive: `tar xzf back.tar.gz ./bench` in
# the checkout's root puts the results in place; ./device-logs holds the rest).
finish() {
  diff /tmp/RESULTS.before bench/RESULTS.md | sed -n 's/^> //p' > "$OUT/RESULTS.new.md"
  rm -rf /tmp/back  # (what an earlier call on this machine left, if it was cut)
  mkdir -p /tmp/back/device-logs /tmp/back/bench/results
  cp "$OUT"/*.log /tmp/back/device-logs/ 2>/dev/null
  cp -r "$RAW" /tmp/back/device-logs/raw
  find bench/results -type f -newer /tmp/RESULTS.before -exec cp {} /tmp/back/bench/results/ \;
  tar czf "$OUT/back.tar.gz" -C /tmp/back . && rm -rf /tmp/back "$OUT"/*.log
  # Last, and bounded: the daemon's quit waits for its clients, and a cut
  # part's expert servers may still be one (a call of 2026-12-06 ran out its
  # time here, with nothing packed, and left the next call a dying daemon).
  if [ -n "$MPS_STARTED" ]; then
    echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps timeout 20 nvidia-cuda-mps-control \
      || pkill -9 -f nvidia-cuda-mps
    rm -rf /tmp/nvidia-mps
  fi
}
trap finish EXIT

# The FFI library with its CUDA part: the carried build (USE_CARRIED=1), else
# built here, unless this warm machine built it from the same sources.
SRC_HASH=$(cat CMakeLists.txt ffi/* | sha1sum | cut -c1-12)
if [ "$(cat /tmp/eaas-build.hash 2>/dev/null)" != "$SRC_HASH" ] || [ ! -f eaas_jax/libeaas_ffi.so ]; then
  if [ -n "${USE_CARRIED:-}" ] && cp "$DIR/lib/libeaas_ffi.so" eaas_jax/ \
      && python3 -c "from eaas_jax.transport import native; assert native.has_cuda_handlers()"; then
    echo "using the carried FFI library"
  else
    t=$(date +%s)
    cmake -S . -B /tmp/eaas-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
        > "$OUT/build.log" 2>&1 \
      && cmake --build /tmp/eaas-build -j"$(nproc)" >> "$OUT/build.log" 2>&1 \
      && cp /tmp/eaas-build/libeaas_ffi.so eaas_jax/ \
      || { echo "the FFI build failed"; tail -30 "$OUT/build.log"; exit 1; }
    echo "built the FFI library in $(( $(date +%s) - t )) s"
  fi
  echo "$SRC_HASH" > /tmp/eaas-build.hash
fi

checkpoint() {
  [ -f "$W1/config.json" ] && return 0
  local t; t=$(date +%s)
  timeout "$(left)" python3 bench/w1_decode_gpu.py --phase make --dir "$W1" > "$OUT/make.log" 2>&1 \
    || { echo "making the W1 checkpoint failed"; tail -20 "$OUT/make.log"; return 1; }
  echo "W1 checkpoint made in $(( $(date +%s) - t )) s"
}

part() {  # NAME COMMAND...: runs COMMAND in the time left, its output in $OUT/NAME.log
  local name=$1 t rc
  shift
  t=$(date +%s)
  [ "$(left)" -gt 5 ] || { echo "== $name: no time left"; return 124; }  # (timeout 0 would not time out)
  echo "== $name ($(left) s left)"
  # -k: a part cleaning up after TERM (serve_load stopping its server waits
  # up to a minute) is killed 10 s on, so that finish() still runs in the call.
  timeout -k 10 "$(left)" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t )) s"
  tail -25 "$OUT/$name.log"
  return $rc
}

for p in "$@"; do
  [ "$(left)" -gt 20 ] || { echo "no time left for $p"; break; }
  case $p in
    ibgda_tests) part ibgda_tests python3 -m pytest -q -x tests/test_ibgda_gpu.py ;;
    gpu_tests) part gpu_tests python3 -m pytest -q -rfEs --tb=short \
        ${GPU_TESTS:-tests/test_expert_matvec.py tests/test_moe.py tests/test_layers.py tests/test_cache_write.py tests/test_router_top_k.py tests/test_decode_prologue.py} ;;
    ibgda_bench) checkpoint && part ibgda_bench python3 bench/ibgda_gpu.py --tokens 16,64,256 --batches 64 \
        --steps 16 --dir "$W1" --commit "$COMMIT" --raw "$RAW/ibgda.jsonl" --resume --append bench/RESULTS.md ;;
    serve)
      # the server's warm-up sized to the load's requests (prompts of 4-48 tokens, 64 generated): fewer shapes
      checkpoint || continue
      # ibgda_gpu.py's deployment (every expert in one server process on this
      # GPU, beside the client) and W1's vocabulary for the random prompts
      read -r toml vocab < <(python3 -c "import ibgda_gpu, w1_decode_gpu as w1
print(ibgda_gpu.deployment_file('/tmp', 'cuda_ipc', 'bfloat16', capacity=256), w1.W1['vocab_size'])")
      XLA_PYTHON_CLIENT_PREALLOCATE=false part serve python3 bench/serve_load.py --model "$W1" \
        --deployment "$toml" --token-prompts "$vocab" \
        --rate "${RATE:-24}" --requests "${REQS:-400}" --max-seconds 60 --max-tokens 64 \
        --warmup-load "${WARM_REQS:-64}" --server-args "--dtype bfloat16 --max-num-seqs 64 --max-model-len 512 --warmup 48 64 -v" \
        --plot bench/results/serve_load_w1.png --raw "$RAW/serve_load-${RATE:-24}-${REQS:-400}-${WARM_REQS:-64}.json" --resume --append bench/RESULTS.md ;;
    disagg_profile) checkpoint && XLA_PYTHON_CLIENT_PREALLOCATE=false part disagg_profile \
        python3 bench/disaggregated_profile.py --dir "$W1" --batch 64 --steps 16 --append bench/RESULTS.md ;;
    forms)
      part forms_gate_up python3 bench/expert_projection_forms.py --dim 2048 --hidden 768 --append bench/RESULTS.md
      part forms_down python3 bench/expert_projection_forms.py --dim 768 --hidden 2048 --append bench/RESULTS.md ;;
    dense_forms)  # W1's query and output projections (dense) at decode's few rows: XLA's dot against the kernels
      part dense_forms_q python3 bench/expert_projection_forms.py --experts 1 --dim 2048 --hidden 4096 \
        --slots 1,4,16 --append bench/RESULTS.md
      part dense_forms_o python3 bench/expert_projection_forms.py --experts 1 --dim 4096 --hidden 2048 \
        --slots 1,4,16 --append bench/RESULTS.md ;;
    plans)
      part plans_gate_up python3 bench/expert_matvec_plans.py --dim 2048 --hidden 768 --banks 2 --append bench/RESULTS.md
      part plans_down python3 bench/expert_matvec_plans.py --dim 768 --hidden 2048 --banks 1 --append bench/RESULTS.md ;;
    paths) part paths python3 bench/routed_experts_paths.py --dim 2048 --hidden 768 --dtype bfloat16 \
        --batches 1,4,16,32 --iters 10 --append bench/RESULTS.md ;;
    dispatch) part dispatch python3 bench/dispatch_host_arrays.py
      XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=1 part dispatch_tfrt python3 bench/dispatch_host_arrays.py ;;
    attn_parts) part attn_parts python3 bench/paged_attention_partitions.py --append bench/RESULTS.md ;;
    w1) checkpoint && part w1 python3 bench/w1_decode_gpu.py --batches "${BATCHES:-1,16,64,256}" --steps 64 \
        --dir "$W1" ${W1FLAGS:---compare-one-token-steps --profile-batches 1,256 --profile-top 40} --jax-peer "$(cd "$DIR" && pwd)/peers/jax-llm-examples/qwen3" \
        --commit "$COMMIT" --raw "$RAW/w1.jsonl" --hlo-dir "$RAW/hlo" --resume --append bench/RESULTS.md ;;
    parity) part parity python3 bench/arch_parity.py ${ARCHS:+--architectures "$ARCHS"} \
        --raw "$RAW/parity.jsonl" --resume --append bench/RESULTS.md ;;
    *) echo "unknown part $p (see the top of bench/device_run.sh)" ;;
  esac
done
