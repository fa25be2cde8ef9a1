#!/usr/bin/env bash
# Train the shipped draft heads for the default model (SmolLM2-135M-Instruct) on one GPU:
#   distill -> Medusa-1 -> Hydra++ -> eval heads -> tree search (<= 64 nodes) -> package assets.
#
# Resumable and split in two stages, each fitting one 9-minute GPU call (every step is bounded
# by `timeout`, and distill / train stop on their own time limits, keeping what they made):
#   bash scripts/train_default_heads.sh 1    # self-distillation (~7.5 min; rerun to continue)
#   bash scripts/train_default_heads.sh 2    # training, accuracy, trees, assets (~8 min)
# or, with longer training, stage 2 in two calls:
#   bash scripts/train_default_heads.sh 2a   # training only
#   bash scripts/train_default_heads.sh 2b   # accuracy, trees, assets, MT-Bench check
# Rerunning a stage continues where it stopped (distill skips done ids; train resumes its checkpoint;
# finished steps are skipped).
#
# Environment (defaults in brackets):
#   MODEL    GGUF file or HF dir of the base model [empty: the embedded default model]
#   PROMPTS  folder with the four distillation prompt files [scripts/data/prompts: a 400-prompt sample of the
#            full files, enough to run the pipeline; the shipped heads used the full files, which
#            scripts/data/prompts/SOURCES.md names]
#   MTBENCH  MT-Bench question.jsonl for a quick measured check [the copy shipped in medusa/bench/datasets]
#   WORK     scratch folder kept between calls on a warm machine [.cache/heads_run]
#   OUT      folder the GPU tool returns [out_heads]
#   ASSETS   where the finished heads go [medusa/assets/heads]
#   DATA_GZ  distilled data from a stage-1 $OUT (or its parts DATA_GZ.part-*), used when $WORK has none [distill.jsonl.gz]
#   HEADS    which heads stage 2 trains and ships [medusa hydra]
#   DISTILL_SECONDS [360]  MEDUSA_SECONDS [120]  HYDRA_SECONDS [200]  N_PROMPTS [20000: every prompt]  BATCH [128]
#   MAX_NEW [512]  BATCH_TOKENS [16384]  EVAL_BATCHES [40]  MT_LIMIT [4]  MT_TOKENS [128]  PY [python3]
#   INIT_HEADS  continue training these heads (a folder, or medusa | hydra for the shipped ones) [none: new heads]
#   HYDRA_LR [1e-3]  MEDUSA_LR [1e-3]
#   HYDRA_LAYERS [2]  HYDRA_PREFIX [512]  Hydra++ MLP depth per head and prefix-layer MLP width; with INIT_HEADS,
#               larger values grow those heads (new blocks start as the identity, `medusa train --init-heads`)
#   SAMPLE_FRACTION [0.3]  share of the distilled responses sampled (temperature 0.7) instead of greedy
#   DRAFT_VOCAB [0]  restrict the trained heads' proposals to this many of the most frequent response tokens
#               (medusa train --draft-vocab; 0: the whole vocabulary)
#   DISTILL_SEED [0]  another seed shuffles the prompts otherwise (another subset within a time limit) and
#               samples other responses; the held-out split (a hash of the prompt id) stays the same
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MEDUSA_CACHE=${MEDUSA_CACHE:-$PWD/.cache/medusa}
MODEL=${MODEL:-}
MODEL_ARGS=()
if [[ -n $MODEL ]]; then MODEL_ARGS=(--model "$MODEL"); fi
PROMPTS=${PROMPTS:-scripts/data/prompts}
MTBENCH=${MTBENCH:-medusa/bench/datasets/mt_bench/question.jsonl}
WORK=${WORK:-.cache/heads_run}
OUT=${OUT:-out_heads}
DATA_GZ=${DATA_GZ:-distill.jsonl.gz}
DISTILL_SECONDS=${DISTILL_SECONDS:-360}
MEDUSA_SECONDS=${MEDUSA_SECONDS:-120}
HYDRA_SECONDS=${HYDRA_SECONDS:-200}
N_PROMPTS=${N_PROMPTS:-20000}
HEADS=${HEADS:-medusa hydra}
BATCH=${BATCH:-128}
MAX_NEW=${MAX_NEW:-512}
BATCH_TOKENS=${BATCH_TOKENS:-16384}
EVAL_BATCHES=${EVAL_BATCHES:-40}
MT_LIMIT=${MT_LIMIT:-4}
MT_TOKENS=${MT_TOKENS:-128}
PY=${PY:-python3}
HYDRA_LR=${HYDRA_LR:-1e-3}
MEDUSA_LR=${MEDUSA_LR:-1e-3}
DISTILL_SEED=${DISTILL_SEED:-0}
SAMPLE_FRACTION=${SAMPLE_FRACTION:-0.3}
HYDRA_LAYERS=${HYDRA_LAYERS:-2}
HYDRA_PREFIX=${HYDRA_PREFIX:-512}
DRAFT_VOCAB=${DRAFT_VOCAB:-0}
ASSETS=${ASSETS:-medusa/assets/heads}
mkdir -p "$WORK" "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$WORK/pipeline.log" >&2; }

stage1() {
  log "distill: up to $N_PROMPTS prompts, ${DISTILL_SECONDS}s, batch $BATCH, model ${MODEL:-the default}"
  timeout $((DISTILL_SECONDS + 90)) $PY -m medusa.cli distill "${MODEL_ARGS[@]}" \
    --prompts "$PROMPTS"/sharegpt_first_turns.jsonl "$PROMPTS"/code_alpaca_2k.json "$PROMPTS"/gsm8k_train.jsonl "$PROMPTS"/alpaca_en_demo.json \
    --out "$WORK/distill.jsonl" --limit "$N_PROMPTS" --max-new-tokens $MAX_NEW --sample-fraction $SAMPLE_FRACTION --temperature 0.7 \
    --batch "$BATCH" --time-limit "$DISTILL_SECONDS" --seed "$DISTILL_SEED" 2>&1 | tr '\r' '\n' | grep -v -E '^(distilling|tokenizing)' | tail -5 | tee -a "$WORK/pipeline.log" || log "distill stopped (timeout or error); the data so far is kept"
  log "distilled records: $(wc -l < "$WORK/distill.jsonl")"
  # the GPU tool returns files of at most 16 MiB: the data comes back in parts (cat them to rejoin)
  rm -f "$OUT"/distill.jsonl.gz.part-*
  gzip -6 -c "$WORK/distill.jsonl" | split -b 15000000 -d - "$OUT/distill.jsonl.gz.part-"
}

train_heads() {  # name, seconds, train args...
  local name=$1 secs=$2; shift 2
  if [[ -f $WORK/$name/heads.json && -f $WORK/$name/.done ]]; then log "train $name: done already"; return; fi
  if [[ -n ${INIT_HEADS:-} ]]; then
    local init=$INIT_HEADS
    [[ $init == medusa || $init == hydra || -d $init ]] || init=$INIT_HEADS/$name  # a folder of both
    set -- "$@" --init-heads "$init"
  fi
  log "train $name: ${secs}s $*"
  timeout $((secs + 75)) $PY -m medusa.cli train "${MODEL_ARGS[@]}" --data "$WORK/distill.jsonl" --out "$WORK/$name" \
    --time-limit "$secs" --epochs 20 --batch-tokens $BATCH_TOKENS --max-len 1024 --warmup 30 --checkpoint-every 100 --eval-batches 10 --draft-vocab "$DRAFT_VOCAB" "$@" \
    2>&1 | tr '\r' '\n' | grep -v '^training' | tee -a "$WORK/pipeline.log"
  touch "$WORK/$name/.done"
}

eval_and_tree() {  # name
  local name=$1
  timeout 120 $PY -m medusa.cli eval heads "${MODEL_ARGS[@]}" --heads "$WORK/$name" --data "$WORK/distill.jsonl" \
    --max-batches $EVAL_BATCHES --batch-tokens $BATCH_TOKENS --json "$WORK/$name.accuracy.json" 2>&1 | tr '\r' '\n' | grep -v '^scoring' | tee -a "$WORK/pipeline.log"
  timeout 60 $PY -m medusa.cli tree --accuracies "$WORK/$name.accuracy.json" --nodes 16,32,64,128 \
    --out "$WORK/$name.trees" --heads "$WORK/$name" --ship-nodes 64 2>&1 | tee -a "$WORK/pipeline.log"
}

stage2a() {
  if [[ ! -s $WORK/distill.jsonl ]]; then
    if [[ -f $DATA_GZ ]]; then
      gunzip -c "$DATA_GZ" > "$WORK/distill.jsonl"
    elif compgen -G "$DATA_GZ.part-*" > /dev/null; then
      cat "$DATA_GZ".part-* | gunzip -c > "$WORK/distill.jsonl"
    else
      echo "no distilled data: run stage 1, or put its distill.jsonl.gz (or its parts) at $DATA_GZ" >&2; exit 2
    fi
  fi
  log "stage 2 on $(wc -l < "$WORK/distill.jsonl") records, heads: $HEADS"
  for name in $HEADS; do
    case $name in
      medusa) train_heads medusa "$MEDUSA_SECONDS" --head-type medusa --num-heads 5 --num-layers 1 --lr "$MEDUSA_LR" --teacher-weight 0 ;;
      hydra) train_heads hydra "$HYDRA_SECONDS" --head-type hydra++ --num-heads 4 --num-layers $HYDRA_LAYERS --prefix-intermediate $HYDRA_PREFIX --lr "$HYDRA_LR" --teacher-weight 1 ;;
      *) echo "unknown heads $name (HEADS takes medusa and/or hydra)" >&2; exit 2 ;;
    esac
  done
}

stage2b() {
  for name in $HEADS; do
    [[ -f $WORK/$name/.done ]] || { echo "$name is not trained: run stage 2a first" >&2; exit 2; }
  done
  for name in $HEADS; do
    eval_and_tree "$name"
    mkdir -p "$ASSETS/$name"
    cp "$WORK/$name/heads.safetensors" "$WORK/$name/heads.json" "$ASSETS/$name/"
    # in parts under the GPU tool's 16 MiB per file (cat them to rejoin; one part for the shipped sizes)
    rm -f "$OUT/$name.heads.safetensors".part-*
    split -b 15000000 -d "$WORK/$name/heads.safetensors" "$OUT/$name.heads.safetensors.part-"
    cp "$WORK/$name/heads.json" "$OUT/$name.heads.json"
  done
  du -b "$ASSETS"/*/heads.safetensors | tee -a "$WORK/pipeline.log"
  if [[ -f $MTBENCH ]]; then
    for name in $HEADS; do
      log "measured: $name heads, $MT_LIMIT MT-Bench prompts x $MT_TOKENS tokens"
      timeout 60 $PY -m medusa.cli generate "${MODEL_ARGS[@]}" --heads "$ASSETS/$name" --prompt-file "$MTBENCH" --limit "$MT_LIMIT" \
        --max-new-tokens "$MT_TOKENS" --json > "$WORK/$name.mtbench8.jsonl" 2>/dev/null || true
      $PY - "$WORK/$name.mtbench8.jsonl" <<'EOF' | tee -a "$WORK/pipeline.log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = sum(r["steps"] for r in rows)
accepted = sum(r["mean_accepted"] * r["steps"] for r in rows)
print(f"{sys.argv[1]}: {len(rows)} prompts, mean accepted {accepted / max(steps, 1):.3f} tokens/step")
EOF
    done
  fi
  local files=(pipeline.log)
  for name in $HEADS; do files+=("$name/train.json" "$name.accuracy.json" "$name.trees"); done
  tar -czf "$OUT/report.tar.gz" -C "$WORK" "${files[@]}" $(cd "$WORK" && ls *.mtbench8.jsonl 2>/dev/null)
  log "stage 2 done: $OUT holds the heads (cat <name>.heads.safetensors.part-* > $ASSETS/<name>/heads.safetensors; <name>.heads.json too) and report.tar.gz"
}

case $STAGE in
  1) stage1 ;;
  2) stage2a; stage2b ;;
  2a) stage2a ;;
  2b) stage2b ;;
  all) stage1; stage2a; stage2b ;;
  *) echo "usage: $0 [1|2|2a|2b|all]" >&2; exit 2 ;;
esac
