#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, check, then benchmark.
#   run(command="bash benchmarks/device_run.sh <steps>", carry=[".whl"])
# steps: any of  setup (the wheels only) tests kernels gemv engine engine-nogemv engine-nolookahead engine-noprefillgraphs engine-peers parity32 parity32-stagger parity32-chunks prefill-profile prefill-modes idle-ab wakeups grpc-hop skinny skinny-gemm decode-ab engine-s1t1 step-trace (TRACE_ARGS) mixed-step jit-compiles serving (SERVING_ARGS: extra flags; grpc-hop: HOP_ARGS, e.g. --iomgr)  (default: tests kernels engine)
set -uo pipefail
# (NO_WHEELS=1: a machine that has the packages already, e.g. a dry run of these steps on a CPU box)
[ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
steps=${*:-tests kernels engine}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers, triton, google.protobuf as p, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'protobuf', p.__version__, 'grpcio', grpc.__version__)"
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    setup) ;;
    tests) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tail -15 ;;
    engine-tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/test_engine.py 2>&1 | tail -25 ;;
    kernels) timeout 240 python3 -m benchmarks.kernels --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -14 ;;
    gemv) timeout 300 python3 -m benchmarks.gemv --out "$OUT" 2>&1 | tee "$OUT/gemv.log" | tail -14 ;;
    engine-nolookahead) timeout 300 python3 -m benchmarks.engine --shape codellama-7b --peers none --engine decode_lookahead=false --out "$OUT" 2>&1 | tee "$OUT/engine-nolookahead.log" | tail -20 ;;
    engine-nogemv) timeout 300 python3 -m benchmarks.engine --shape codellama-7b --peers none --workloads s1,t1 --engine triton_gemv=false --out "$OUT" 2>&1 | tee "$OUT/engine-nogemv.log" | tail -20 ;;
    engine) timeout 300 python3 -m benchmarks.engine --shape codellama-7b --peers none --out "$OUT" 2>&1 | tee "$OUT/engine.log" | tail -40 ;;
    parity) timeout 200 python3 -m benchmarks.parity --prompts 32 --new-tokens 64 --out "$OUT" 2>&1 | tail -4 ;;
    control) timeout 300 python3 -m benchmarks.parity --control --prompts 8 --new-tokens 24 --out "$OUT" 2>&1 | tail -5 ;;
    parity32) timeout 200 python3 -m benchmarks.parity --dtype float32 --out "$OUT" 2>&1 | tail -4 ;;
    parity32-stagger) timeout 200 python3 -m benchmarks.parity --dtype float32 --stagger --out "$OUT" 2>&1 | tail -4 ;;
    parity32-chunks) timeout 200 python3 -m benchmarks.parity --dtype float32 --stagger --prefill-cap 48 --out "$OUT" 2>&1 | tail -4 ;;
    prefill-modes) timeout 300 python3 -m benchmarks.prefill_modes --out "$OUT" 2>&1 | tail -20 ;;
    prefill-profile) timeout 200 python3 -m benchmarks.profile_decode --prefill-only --out "$OUT" 2>&1 | tail -12 ;;
    engine-noprefillgraphs) timeout 300 python3 -m benchmarks.engine --shape codellama-7b --peers none --workloads s1,t1 --engine prefill_graph_max_tokens=0 --out "$OUT" 2>&1 | tee "$OUT/engine-noprefillgraphs.log" | tail -20 ;;
    profile) timeout 200 python3 -m benchmarks.profile_decode --out "$OUT" 2>&1 | tail -36 ;;
    idle-ab) python3 -m benchmarks.cpu_idle | tee "$OUT/cpu-idle.log"
      for hold in off on off on; do
        echo "--- PM QoS request: $hold"
        [ $hold = on ] && { python3 -m benchmarks.cpu_idle --hold 0 > /tmp/hold.log & hold_pid=$!; sleep 2; tail -1 /tmp/hold.log; }
        timeout 120 python3 -m benchmarks.wakeups --messages 200 2>&1 | grep -v "^\[tcp\] one\|^\[unix\] one"
        timeout 120 python3 -m benchmarks.grpc_hop --requests 200 2>&1 | tail -7
        [ $hold = on ] && { python3 -m benchmarks.cpu_idle | tail -2; kill $hold_pid; wait $hold_pid; }
      done 2>&1 | tee "$OUT/idle-ab.log" ;;
    wakeups) timeout 120 python3 -m benchmarks.wakeups 2>&1 | tee "$OUT/wakeups.log" | tail -18 ;;
    grpc-hop) timeout 240 python3 -m benchmarks.grpc_hop ${HOP_ARGS:-} 2>&1 | tee "$OUT/grpc-hop.log" | tail -24 ;;
    skinny) timeout 200 python3 -m benchmarks.skinny 2>&1 | tee "$OUT/skinny.log" | tail -14 ;;
    decode-ab) for v in true false true false; do timeout 200 python3 -m benchmarks.decode_batches --engine triton_skinny=$v 2>&1 | tail -2; done | tee "$OUT/decode-ab.log" ;;
    engine-s1t1) timeout 300 python3 -m benchmarks.engine --shape codellama-7b --peers none --workloads s1,t1 --out "$OUT" 2>&1 | tee "$OUT/engine-s1t1.log" | tail -20 ;;
    skinny-gemm) timeout 500 python3 -m benchmarks.skinny_gemm 2>&1 | tee "$OUT/skinny-gemm.log" | tail -45 ;;
    serving) timeout 570 python3 -m benchmarks.serving --shape ${SERVING_SHAPE:-codellama-7b} --out "$OUT" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/serving.log" | tail -45 ;;
    step-trace) timeout 400 python3 -m benchmarks.step_trace --out "$OUT/step-trace.json" ${TRACE_ARGS:-} 2>&1 | tee "$OUT/step-trace.log" | tail -40 ;;
    jit-compiles) timeout 500 python3 -m benchmarks.jit_compiles --out "$OUT" 2>&1 | tee "$OUT/jit-compiles.log" | grep -v "^\[" | tail -20 ;;
    mixed-step) timeout 300 python3 -m benchmarks.mixed_step 2>&1 | tee "$OUT/mixed-step.log" | grep -v "^\[" | tail -80 ;;
    engine-peers) timeout 540 python3 -m benchmarks.engine --shape codellama-7b --out "$OUT" 2>&1 | tee "$OUT/engine-peers.log" | tail -40 ;;
  esac
done
