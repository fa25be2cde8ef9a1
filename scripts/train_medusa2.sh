#!/usr/bin/env bash
# Medusa-2 for the default model (SmolLM2-135M-Instruct) on one GPU: the shipped Medusa-1 and
# Hydra++ heads trained on jointly with LoRA adapters on the backbone (`medusa train --joint`,
# warm-up = the trained heads), then accuracy, trees, quality against the original, and
# acceptance / speedup on all 80 MT-Bench first turns against each backbone's own plain decoding.
#
# Each stage fits one GPU call of at most ~9.5 minutes and resumes when rerun:
#   bash scripts/train_medusa2.sh train    # joint training, medusa2 then hydra2 (M2_SECONDS + H2_SECONDS)
#   bash scripts/train_medusa2.sh eval     # accuracy + trees (into each heads.json), quality on MT-Bench and held-out data
#   bash scripts/train_medusa2.sh bench1   # 80 x 256: ar, Medusa-1, Hydra++ (chain and heads alone) on the original
#   bash scripts/train_medusa2.sh bench2   # 80 x 256: the adapted backbone's ar and Medusa-2
#   bash scripts/train_medusa2.sh bench3   # 80 x 256: the adapted backbone's ar and jointly trained Hydra++ (chain, heads alone)
#   bash scripts/train_medusa2.sh report   # the figures benchmarks/HEADS.md needs, from the files above
#   bash scripts/train_medusa2.sh ship     # copy the variants to medusa/assets/heads/{medusa2,hydra2} if their quality met the bar
# Needs the distilled data of scripts/train_default_heads.sh stage 1 ($WORK/distill.jsonl or the
# parts $DATA_GZ.part-*) and, for the benches, the MT-Bench questions.
#
# Environment (defaults in brackets): MODEL [/tmp/m/smollm2.gguf]  WORK [.cache/heads_run]  OUT [out_medusa2]
#   DATA_GZ [distill.jsonl.gz]  MTBENCH [medusa/bench/datasets/mt_bench/question.jsonl]  VARIANTS [medusa2 hydra2]
#   M2_SECONDS [240]  H2_SECONDS [240]  MARGIN [90] (seconds a training run may take past its time limit)  EVAL_TIMEOUT [150]
#   LORA_RANK [16]  LORA_ALPHA [32]  LORA_TARGETS [all]
#   M2_LR [3e-4]  H2_LR [3e-4] (heads)  ADAPTER_LR [5e-5]  KL_WEIGHT [1]  HEADS_WEIGHT [0.2]
#   H2_DRAFT_VOCAB [32768]  QUALITY_PROMPTS [80]  QUALITY_TOKENS [64]  BENCH_TOKENS [256]  BENCH_LIMIT [all]  PY [python3]
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MEDUSA_CACHE=${MEDUSA_CACHE:-$PWD/.cache/medusa}
MODEL=${MODEL:-/tmp/m/smollm2.gguf}
WORK=${WORK:-.cache/heads_run}
OUT=${OUT:-out_medusa2}
DATA_GZ=${DATA_GZ:-distill.jsonl.gz}
MTBENCH=${MTBENCH:-medusa/bench/datasets/mt_bench/question.jsonl}
[[ -f $MTBENCH ]] || MTBENCH=${MEDUSA_DATA:-shared/data}/mt_bench/question.jsonl
VARIANTS=${VARIANTS:-medusa2 hydra2}
M2_SECONDS=${M2_SECONDS:-240}
H2_SECONDS=${H2_SECONDS:-240}
LORA_RANK=${LORA_RANK:-16}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_TARGETS=${LORA_TARGETS:-all}
M2_LR=${M2_LR:-3e-4}
H2_LR=${H2_LR:-3e-4}
ADAPTER_LR=${ADAPTER_LR:-5e-5}
KL_WEIGHT=${KL_WEIGHT:-1}
HEADS_WEIGHT=${HEADS_WEIGHT:-0.2}
QUALITY_PROMPTS=${QUALITY_PROMPTS:-80}
QUALITY_TOKENS=${QUALITY_TOKENS:-64}
BENCH_TOKENS=${BENCH_TOKENS:-256}
BENCH_LIMIT=${BENCH_LIMIT:-}
H2_DRAFT_VOCAB=${H2_DRAFT_VOCAB:-32768}
PY=${PY:-python3}
mkdir -p "$WORK" "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$WORK/medusa2.log" >&2; }
limit=(); [[ -n $BENCH_LIMIT ]] && limit=(--limit "$BENCH_LIMIT")

data() {
  [[ -s $WORK/distill.jsonl ]] && return
  if compgen -G "$DATA_GZ.part-*" > /dev/null; then cat "$DATA_GZ".part-* | gunzip -c > "$WORK/distill.jsonl"
  elif [[ -f $DATA_GZ ]]; then gunzip -c "$DATA_GZ" > "$WORK/distill.jsonl"
  else echo "no distilled data: run scripts/train_default_heads.sh 1, or put its parts at $DATA_GZ.part-*" >&2; exit 2; fi
}

init_of() { case $1 in medusa2) echo medusa ;; hydra2) echo hydra ;; *) echo "unknown variant $1" >&2; exit 2 ;; esac; }

train() {  # joint training from the shipped heads (their training was the warm-up)
  data
  for v in $VARIANTS; do
    if [[ -f $WORK/$v/.done ]]; then log "train $v: done already"; continue; fi
    local secs=$M2_SECONDS lr=$M2_LR teacher=0 vocab=0
    # Hydra++ as shipped: the teacher loss, and proposals among the 32,768 most frequent tokens (chosen again)
    [[ $v == hydra2 ]] && { secs=$H2_SECONDS; lr=$H2_LR; teacher=1; vocab=$H2_DRAFT_VOCAB; }
    log "train $v: ${secs}s, from the shipped $(init_of "$v") heads, LoRA r$LORA_RANK a$LORA_ALPHA on $LORA_TARGETS"
    timeout $((secs + ${MARGIN:-90})) $PY -m medusa.cli train --model "$MODEL" --data "$WORK/distill.jsonl" --out "$WORK/$v" \
      --init-heads "$(init_of "$v")" --joint --lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA" --lora-targets "$LORA_TARGETS" \
      --lr "$lr" --adapter-lr "$ADAPTER_LR" --kl-weight "$KL_WEIGHT" --heads-weight "$HEADS_WEIGHT" --teacher-weight $teacher --draft-vocab $vocab \
      --time-limit "$secs" --epochs 20 --batch-tokens 16384 --max-len 1024 --warmup 30 --checkpoint-every 100 --eval-batches 10 \
      2>&1 | tr '\r' '\n' | grep -v '^training' | tee -a "$WORK/medusa2.log"
    touch "$WORK/$v/.done"
  done
}

evaluate() {  # accuracy and trees on the adapted backbone; quality against the original
  data
  for v in $VARIANTS; do
    [[ -f $WORK/$v/.done ]] || { echo "$v is not trained: run the train stage first" >&2; exit 2; }
    timeout ${EVAL_TIMEOUT:-150} $PY -m medusa.cli eval heads --model "$MODEL" --heads "$WORK/$v" --data "$WORK/distill.jsonl" --max-batches 40 \
      --json "$WORK/$v.accuracy.json" 2>&1 | tr '\r' '\n' | grep -v '^scoring' | tee -a "$WORK/medusa2.log"
    timeout 60 $PY -m medusa.cli tree --accuracies "$WORK/$v.accuracy.json" --nodes 16,32,64,128 --out "$WORK/$v.trees" \
      --heads "$WORK/$v" --ship-nodes 64 2>&1 | tee -a "$WORK/medusa2.log"
    for set in mtbench heldout; do
      local src=(--prompt-file "$MTBENCH" --limit "$QUALITY_PROMPTS")
      [[ $set == heldout ]] && src=(--data "$WORK/distill.jsonl" --limit "$QUALITY_PROMPTS")
      log "quality $v on $set"
      timeout ${EVAL_TIMEOUT:-150} $PY -m medusa.cli eval quality --model "$MODEL" --heads "$WORK/$v" "${src[@]}" --new-tokens "$QUALITY_TOKENS" \
        --json "$WORK/$v.quality-$set.json" 2>&1 | tr '\r' '\n' | grep -v '^comparing' | tee -a "$WORK/medusa2.log" || true
    done
  done
  # the noise floor: the original in bfloat16 against itself in float32 (what numerics alone change), once
  [[ -f $WORK/noise.quality-mtbench.json ]] || timeout ${EVAL_TIMEOUT:-150} $PY -m medusa.cli eval quality --model "$MODEL" --heads none --prompt-file "$MTBENCH" --limit "$QUALITY_PROMPTS" \
    --new-tokens "$QUALITY_TOKENS" --dtype bfloat16 --reference-dtype float32 --json "$WORK/noise.quality-mtbench.json" 2>&1 \
    | tr '\r' '\n' | grep -v '^comparing' | tee -a "$WORK/medusa2.log" || true
  tar -czf "$OUT/medusa2-eval.tgz" -C "$WORK" medusa2.log $(cd "$WORK" && ls -d *.accuracy.json *.quality-*.json *.trees */train.json */heads.json 2>/dev/null)
}

overlay() {  # a copy of the package whose shipped medusa or hydra slot holds the variant (medusa bench knows those names)
  local v=$1 slot; slot=$(init_of "$v")
  rm -rf "$WORK/pkg-$v"; mkdir -p "$WORK/pkg-$v"
  cp -r medusa "$WORK/pkg-$v/medusa"
  rm -rf "$WORK/pkg-$v/medusa/assets/heads/$slot"; mkdir -p "$WORK/pkg-$v/medusa/assets/heads/$slot"
  cp "$WORK/$v"/heads.safetensors "$WORK/$v"/heads.json "$WORK/$v"/adapters.safetensors "$WORK/pkg-$v/medusa/assets/heads/$slot/"
  realpath "$WORK/pkg-$v"
}

bench() {  # name, modes, [variant]: the adapters merge into the model when the variant loads, before any mode runs,
           # so `ar` there is the adapted backbone's own plain decoding
  local name=$1 modes=$2 v=${3:-} path=$PYTHONPATH
  [[ -n $v ]] && path=$(overlay "$v"):$PYTHONPATH
  log "bench $name: $modes"
  PYTHONPATH=$path timeout 560 $PY -m medusa.cli bench --model "$MODEL" --modes "$modes" --max-new-tokens "$BENCH_TOKENS" "${limit[@]}" \
    --name "$name" --out "$WORK/bench" 2>&1 | grep -v -E "run\]|run, |^\s*$" | tail -12 | tee -a "$WORK/medusa2.log"
  cp "$WORK/bench/$name".* "$OUT/" 2>/dev/null || true
}

report() {
  $PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
def load(p):
    p = w / p
    return json.loads(p.read_text()) if p.is_file() else None
print("| run | mode | accepted / step | tokens/s | x own plain |")
print("|---|---|---|---|---|")
for name in ("medusa2-base", "medusa2-m2", "medusa2-h2"):
    d = load(f"bench/{name}.json") or {"modes": {}}
    for label, r in d["modes"].items():  # medusa bench's result file: summary figures per mode label
        print(f"| {name} | {label} ({r.get('tree')}) | {r.get('mean_accepted')} | {r.get('tokens_per_s_median')} | "
              f"{r.get('speedup_vs_ar')} (same output as its plain: {r.get('matches_ar_count')}/{r.get('prompts')}) |")
print()
print("| variant | prompts | mean KL (nats/token) | identical greedy outputs | ppl original | ppl adapted | kept |")
print("|---|---|---|---|---|---|---|")
for v in ("medusa2", "hydra2", "noise"):
    for s in ("mtbench", "heldout"):
        q = load(f"{v}.quality-{s}.json")
        if q:
            print(f"| {v} ({s}) | {q['prompts']} | {q['mean_kl']:.5f} | {q['identical']}/{q['prompts']} | {q['ppl_original']:.4f} | "
                  f"{q['ppl_adapted']:.4f} | {q['kept']} |")
for v in ("medusa2", "hydra2"):
    t = load(f"{v}/train.json")
    if t:
        last = (t.get("history") or [{}])[-1]
        print(f"{v}: {t['steps']} steps in {t['seconds_this_run']} s on {t['device']}, {t['records']} records / "
              f"{t['response_tokens']} response tokens; held-out top-1 {last.get('top1')}, KL {last.get('kl')}, "
              f"argmax agreement {last.get('agree')}")
EOF
}

ship() {  # only variants that kept the original's quality on both prompt sets (FORCE=1 overrides)
  for v in $VARIANTS; do
    local kept
    kept=$($PY -c "import json,sys; print(all(json.load(open(f)).get('kept') for f in sys.argv[1:]))" \
      "$WORK/$v.quality-mtbench.json" "$WORK/$v.quality-heldout.json" 2>/dev/null || echo False)
    if [[ $kept != True && ${FORCE:-0} != 1 ]]; then log "ship $v: refused, its quality misses the bar (medusa eval quality)"; continue; fi
    mkdir -p "medusa/assets/heads/$v"
    cp "$WORK/$v"/heads.safetensors "$WORK/$v"/heads.json "$WORK/$v"/adapters.safetensors "medusa/assets/heads/$v/"
    cp "$WORK/$v.trees"/tree16.json "$WORK/$v.trees"/tree32.json "medusa/assets/heads/$v/" 2>/dev/null || true
    split -b 15000000 -d "$WORK/$v/heads.safetensors" "$OUT/$v.heads.safetensors.part-"
    cp "$WORK/$v/heads.json" "$WORK/$v/adapters.safetensors" "$OUT/" 2>/dev/null && mv "$OUT/heads.json" "$OUT/$v.heads.json" \
      && mv "$OUT/adapters.safetensors" "$OUT/$v.adapters.safetensors"
  done
}

case $STAGE in
  train) train ;;
  eval) evaluate ;;
  bench1) bench medusa2-base ar,medusa,hydra,hydra:+lookup0 ;;
  bench2) bench medusa2-m2 ar,medusa medusa2 ;;
  bench3) bench medusa2-h2 ar,hydra,hydra:+lookup0 hydra2 ;;
  report) report ;;
  ship) ship ;;
  *) echo "usage: $0 train|eval|bench1|bench2|bench3|report|ship" >&2; exit 2 ;;
esac
