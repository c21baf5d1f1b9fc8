#!/usr/bin/env bash
# The TTFT hop on the GPU machine, in one call: this checkout's figures (serving benchmark, then two more
# stack instances of the low-load TTFT probe, for the spread between instances), the same with hop
# timestamps (benchmarks/ttft_hops.py), and a baseline: files of an older commit copied over this checkout.
#   git show <commit>:worker/service.py > ab-base/worker/service.py   (... whichever files differ)
#   run(command="OUT=$OUT bash benchmarks/serving_ab.sh", carry=[".whl"])   (ab-base/ must not be ignored)
# ALT_ENV="NAME=value ...[;NAME=value ...]": more probes of this checkout, one per variant (environment)
# in each repeat, interleaved with the repeats (alt<variant>r<repeat>), as are the baseline's probes
# (base1, base2); BASE_ENV: the baseline's environment; HOPS_ENV: the instrumented probe's.
# REPEATS (default 2): how many of each of those probes; REP_PHASES (default ttft): what each probe runs,
# SWEEP: its sweep's concurrencies (a variant may set either: ALT_ENV="REP_PHASES=w1,sweep");
# HOPS=0: no instrumented probe (HOPS=N: N, and N of the baseline's; HOPS_ALTS=1: N of each variant too);
# NEW=0: no first full run (new/), the repeats only.
# Results: $OUT/{new,rep1,rep2,alt1r1,...,base1,base2,hops,basehops,alt1hops}/ (JSON; *hops*/hops.txt). SHAPE=--quick SERVING_SHAPE=tiny: a CPU dry run.
set -u
R=${OUT:-/tmp/serving-ab}; SHAPE=${SHAPE:-}; BASE=${BASE:-ab-base}
IFS=';' read -ra ALTS <<< "${ALT_ENV:-}"
mkdir -p "$R"/new
for r in $(seq 1 "${REPEATS:-2}"); do
  mkdir -p "$R"/rep$r
  [ -d "$BASE" ] && mkdir -p "$R"/base$r
  for i in "${!ALTS[@]}"; do mkdir -p "$R"/alt$((i + 1))r$r; done
done
if [ "${NEW:-1}" = 1 ]; then
  OUT=$R/new SERVING_ARGS="${NEW_ARGS:---phases engine,w1,ttft,sweep} $SHAPE" bash benchmarks/device_run.sh serving
else
  bash benchmarks/device_run.sh setup
fi
export NO_WHEELS=1  # (installed by the first step)
pristine=$(mktemp -d) && cp -r gateway worker codestream "$pristine"/
restore() { rm -rf gateway worker codestream && cp -r "$pristine"/* .; }
for r in $(seq 1 "${REPEATS:-2}"); do
  OUT=$R/rep$r SERVING_ARGS="--phases ${REP_PHASES:-ttft} ${SWEEP:+--sweep $SWEEP} $SHAPE" bash benchmarks/device_run.sh serving | tail -3
  for i in "${!ALTS[@]}"; do
    # (a subshell: a variant may set REP_PHASES or SWEEP too)
    (export ${ALTS[$i]}; OUT=$R/alt$((i + 1))r$r SERVING_ARGS="--phases ${REP_PHASES:-ttft} ${SWEEP:+--sweep $SWEEP} $SHAPE" bash benchmarks/device_run.sh serving | tail -3)
  done
  if [ -d "$BASE" ]; then
    cp -r "$BASE"/* .
    env ${BASE_ENV:-} OUT=$R/base$r SERVING_ARGS="--phases ${REP_PHASES:-ttft} ${SWEEP:+--sweep $SWEEP} $SHAPE" bash benchmarks/device_run.sh serving | tail -3
    restore
  fi
done
# Hop timestamps: this checkout's (hops, hops2, ...) and, with a baseline, the baseline's instrumented the
# same way (basehops, ...), interleaved; HOPS=N: N of each (the anchors must match the baseline's files too).
hops() {  # NAME: instrument what is checked out now, run the TTFT probe, print the hop table
  python3 -m benchmarks.ttft_hops instrument /tmp/hops-overlay && cp -r /tmp/hops-overlay/* . && rm -rf /tmp/hops-overlay
  mkdir -p "$R/$1"
  env ${HOPS_ENV:-} CODESTREAM_HOPS=1 OUT=$R/$1 SERVING_ARGS="--phases ttft $SHAPE" bash benchmarks/device_run.sh serving | tail -3
  python3 -m benchmarks.ttft_hops report "$R/$1"/serving-gateway.log "$R/$1"/serving-worker.log "$R/$1"/serving.log | tee "$R/$1"/hops.txt
  restore
}
for h in $(seq 1 "${HOPS:-1}"); do
  suffix=$([ "$h" = 1 ] || echo "$h")
  hops hops$suffix
  if [ -n "${HOPS_ALTS:-}" ]; then  # HOPS_ALTS=1: each variant too (alt<variant>hops)
    for i in "${!ALTS[@]}"; do (export ${ALTS[$i]}; hops alt$((i + 1))hops$suffix); done
  fi
  if [ -d "$BASE" ]; then cp -r "$BASE"/* . && hops basehops$suffix; fi
done
rm -rf "$pristine"
rm -f "$R"/*/serving-gateway.log "$R"/*/serving-worker.log "$R"/{hops*,rep*,alt*,base*}/serving.log
ls -R "$R"
# One line per stack instance: its low-load TTFT median and what it adds over the engine alone (measured in new/).
python3 - "$R" "${ALT_ENV:-}" <<'PY'
import glob, json, sys
root = sys.argv[1]
engine = None
for path in glob.glob(f"{root}/new/serving-*.json"):
    engine = json.load(open(path)).get("engine", {}).get("ttft_ms", {}).get("median")
    print(f"engine alone: TTFT median {engine:.3f} ms")
names = sorted({p.split("/")[-2] for p in glob.glob(f"{root}/*/serving-*.json")}, key=lambda n: (n[-1:], n))
for i, alt in enumerate(a for a in sys.argv[2].split(";") if a.strip()):
    print(f"alt{i + 1}: {alt.strip()}")
for name in names:
    for path in glob.glob(f"{root}/{name}/serving-*.json"):
        report = json.load(open(path))
        service = report["service"]
        # An instance that ran the engine alone itself (REP_PHASES=engine,...) is compared with its own.
        own = report.get("engine", {}).get("ttft_ms", {}).get("median", engine)
        qos = report["machine"].get("pm_qos_request_us")
        line = f"{name:6s} PM QoS {qos!s:>10s} us"
        if "ttft" in service:
            ttft = service["ttft"]["summary"]["ttft_ms"]["median"]
            line += f"  engine {own or 0:7.3f}  TTFT median {ttft:7.3f} ms"
            line += f"  added {ttft - own:6.3f} ms" if own is not None else ""
        if "ttft_sync_client" in service:
            sync = service["ttft_sync_client"]["summary"]["ttft_ms"]["median"]
            line += f"  | sync client {sync:7.3f} ms" + (f"  added {sync - own:6.3f} ms" if own is not None else "")
        if "w1" in service:
            w1 = service["w1"]["summary"]["output_throughput"]
            line += f"  | W1 {w1:,.1f} tok/s"
            if "engine" in report:
                alone = report["engine"]["w1"]["tokens_per_s"]
                line += f" of engine alone {alone:,.1f} ({100 * w1 / alone:.1f} %)"
        for c, result in service.get("sweep", {}).items():
            m = result["summary"]
            itl = m["itl_ms"]
            line += (
                f"\n         c={c:>3s}: {m['output_throughput']:,.1f} tok/s, {m['errors']} errors, TTFT median "
                f"{m['ttft_ms']['median']:.1f} ms, ITL {itl['median']:.2f} / {itl['p99']:.2f} ms ({itl['p99'] / itl['median']:.2f})"
            )
            if halts := result.get("machine_pauses"):
                line += f"; machine paused {halts['machine_pauses']}x, {halts['machine_pauses_over_5ms']} over 5 ms"
                line += f"; probe work p99 {'/'.join(f'{p:.0f}' for p in halts.get('work_p99_us', []))} µs"
        print(line)
PY
# The device tool brings back at most 8 files a call: all of them in one archive.
[ -n "${TAR:-}" ] && tar czf "$R.tgz" -C "$R" . && rm -rf "$R" && ls -l "$R.tgz"
