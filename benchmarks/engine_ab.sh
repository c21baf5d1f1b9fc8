#!/usr/bin/env bash
# The engine alone, this checkout against an older commit's files (ab-base/, as in serving_ab.sh), interleaved:
#   git show <commit>:worker/engine/engine.py > ab-base/worker/engine/engine.py   (... whichever files differ)
#   run(command="OUT=$OUT bash benchmarks/engine_ab.sh", carry=[".whl"])
# REPEATS (default 2) pairs; SHAPE (default codellama-7b), WORKLOADS (default w1) and ENGINE_ARGS go to
# benchmarks.engine (a CPU dry run: NO_WHEELS=1 SHAPE=tiny ENGINE_ARGS=--quick).
# Results: $OUT/engine-ab/{new,base}/*.json; prints one line per run (tok/s, steps, steps launched ahead,
# host time per phase inside the steps).
set -u
R=${OUT:-/tmp}/engine-ab; BASE=${BASE:-ab-base}
bash benchmarks/device_run.sh setup || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
pristine=$(mktemp -d) && cp -r worker "$pristine"/
for r in $(seq 1 "${REPEATS:-2}"); do
  for v in new base; do
    rm -rf worker && cp -r "$pristine"/worker .
    [ $v = base ] && cp -r "$BASE"/* .
    mkdir -p "$R/$v"
    echo "--- $v, repeat $r $(date -u +%T)"
    timeout 200 python3 -m benchmarks.engine --shape "${SHAPE:-codellama-7b}" --peers none --workloads "${WORKLOADS:-w1}" \
      ${ENGINE_ARGS:-} --out "$R/$v/run$r.json" 2>&1 | grep -E "^ours|output throughput|TPOT|TTFT" | head -4
  done
done
rm -rf worker && cp -r "$pristine"/worker . && rm -rf "$pristine"
python3 - "$R" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*/run*.json")):
    w = json.load(open(path))["ours"].get("w1")
    if not w:
        continue
    phases = " ".join(f"{k[5:-2]} {w[k]:.2f}" for k in ("step_schedule_s", "step_launch_s", "step_sample_s", "step_outputs_s") if k in w)
    print(f"{path.split('/')[-2]:5s} {path.split('/')[-1]:9s} W1 {w['tokens_per_s']:8,.1f} tok/s  {w['steps']} steps, "
          f"{w.get('step_steps_ahead', w.get('steps_ahead', '?'))} ahead  | host s: {phases}")
PY
