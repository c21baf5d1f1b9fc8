#!/usr/bin/env bash
# The TTFT hop on the GPU machine, in one call: this checkout's figures (serving benchmark, then two more
# stack instances of the low-load TTFT probe, for the spread between instances), the same with hop
# timestamps (benchmarks/ttft_hops.py), and a baseline: files of an older commit copied over this checkout.
#   git show <commit>:worker/service.py > ab-base/worker/service.py   (... whichever files differ)
#   run(command="OUT=$OUT bash benchmarks/serving_ab.sh", carry=[".whl"])   (ab-base/ must not be ignored)
# ALT_ENV="NAME=value ...": two more probes of this checkout with that environment, interleaved with the
# repeats (alt1, alt2); BASE_ENV: the environment of the baseline's probe.
# Results: $OUT/{new,rep1,rep2,alt1,alt2,hops,base}/ (JSON; hops/hops.txt). SHAPE=--quick SERVING_SHAPE=tiny: a CPU dry run.
set -u
R=${OUT:-/tmp/serving-ab}; SHAPE=${SHAPE:-}; BASE=${BASE:-ab-base}
mkdir -p "$R"/new "$R"/rep1 "$R"/rep2 "$R"/hops "$R"/base
[ -n "${ALT_ENV:-}" ] && mkdir -p "$R"/alt1 "$R"/alt2
OUT=$R/new SERVING_ARGS="${NEW_ARGS:---phases engine,w1,ttft,sweep} $SHAPE" bash benchmarks/device_run.sh serving
export NO_WHEELS=1  # (installed by the first step)
for r in 1 2; do
  OUT=$R/rep$r SERVING_ARGS="--phases ttft $SHAPE" bash benchmarks/device_run.sh serving | tail -3
  [ -n "${ALT_ENV:-}" ] && env $ALT_ENV OUT=$R/alt$r SERVING_ARGS="--phases ttft $SHAPE" bash benchmarks/device_run.sh serving | tail -3
done
pristine=$(mktemp -d) && cp -r gateway worker codestream "$pristine"/
python3 -m benchmarks.ttft_hops instrument /tmp/hops-overlay && cp -r /tmp/hops-overlay/* .
CODESTREAM_HOPS=1 OUT=$R/hops SERVING_ARGS="--phases ttft $SHAPE" bash benchmarks/device_run.sh serving | tail -3
python3 -m benchmarks.ttft_hops report "$R"/hops/serving-gateway.log "$R"/hops/serving-worker.log "$R"/hops/serving.log | tee "$R"/hops/hops.txt
restore() { rm -rf gateway worker codestream && cp -r "$pristine"/* .; }
restore
if [ -d "$BASE" ]; then
  cp -r "$BASE"/* .
  env ${BASE_ENV:-} OUT=$R/base SERVING_ARGS="--phases ttft $SHAPE" bash benchmarks/device_run.sh serving | tail -3
  restore
fi
rm -rf "$pristine"
rm -f "$R"/*/serving-gateway.log "$R"/*/serving-worker.log "$R"/{hops,rep1,rep2,alt1,alt2,base}/serving.log
ls -R "$R"
