#!/usr/bin/env bash
# The GPU figures of benchmarks/BENCHMARKS.md in ~8-minute calls on a lent machine (after the
# model parts were carried, see env.sh). Results are packed into $OUT/results-<part>.tgz.
#   bash scripts/gpu/measure.sh 1   # fp32 golden, all 80 MT-Bench prompts x 256 tokens
#   bash scripts/gpu/measure.sh 2   # engine concurrency, step cost of the default model's shape
#   bash scripts/gpu/measure.sh 3   # per-step profile, graphs alone and with torch.compile
#   bash scripts/gpu/measure.sh 4   # all 80 prompts with torch.compile; adaptive speculation under concurrency
#   bash scripts/gpu/measure.sh 5   # GPU tests; the engine (CUDA graphs per batch bucket) under concurrency, ar/spec/auto
#   bash scripts/gpu/measure.sh 6   # batch-1 decode on 20 prompts (ar, Medusa, Hydra++)
#   bash scripts/gpu/measure.sh 7   # GPU tests; plain vs auto at concurrency 64, warm engines alternating (bench --repeats)
#   bash scripts/gpu/measure.sh 8   # host-time profile of the engine's scheduler at batch 64, plain and adaptive
#   bash scripts/gpu/measure.sh 9   # attention kernels at the step's shapes; graphed step with SDPA vs auto attention; per-operator profile
#   bash scripts/gpu/measure.sh 10  # the Triton kernels: GPU tests; attention candidates; step profile and all 80 prompts, auto vs triton attention
#   bash scripts/gpu/measure.sh 11  # GPU tests (auto now takes the attention kernel in half precision); attention at long KV spans
#   bash scripts/gpu/measure.sh 12  # held-out ShareGPT prompts, auto vs torch attention; engine concurrency with auto
#   bash scripts/gpu/measure.sh 13  # split-KV attention: GPU tests; attention at 48 shapes; step profile; 80 prompts, auto vs torch
#   bash scripts/gpu/measure.sh 14  # grown heads, 1/3: a fourth distillation (seed 3, half of it sampled) into /tmp/heads_run
#   bash scripts/gpu/measure.sh 15  # grown heads, 2/3: the shipped Hydra++ heads grown (3 layers, prefix MLP 1536) and trained on it
#   bash scripts/gpu/measure.sh 16  # grown heads, 3/3: all 80 prompts with the shipped heads; step profile by operator; the grown heads' accuracy, trees, all 80 prompts
#   bash scripts/gpu/measure.sh 17  # split top-k: GPU tests; draft top-k candidates; step profile and all 80 prompts, split vs one program per row
#   bash scripts/gpu/measure.sh 18  # the working tree against the code in .old (carried; `git archive BASE medusa | tar -x -C .old`):
#                                   # GPU tests; step profiles by operator; all 80 prompts, each code in turn (the new one with tree128 too)
#   bash scripts/gpu/measure.sh 19  # the engine under concurrency (plain vs auto, 2 rounds), the working tree
#   bash scripts/gpu/measure.sh 20  # the 128-node tree: step profile, all 80 prompts beside the 64-node tree, the engine forced onto it
#   bash scripts/gpu/measure.sh 21  # prompt-lookup chains: GPU tests; all 80 prompts, the 64- and 128-node trees with and without a chain
#   bash scripts/gpu/measure.sh 22  # the engine under concurrency (plain vs auto, 2 rounds), the default tree and then with a lookup chain
#   bash scripts/gpu/measure.sh 23  # lookup16 shipped with the Hydra++ heads: GPU tests; 80 prompts (chain on/off); engine at 1 (80 requests) and 1-64
#   bash scripts/gpu/measure.sh 24  # the engine again (auto measures the lookup tree on steps without its chain too): at 1 (80 requests) and 1-64
#   bash scripts/gpu/measure.sh 25  # one decoding core (issue 23), the working tree against the code in .old (as 18): GPU tests;
#                                   # all 80 prompts x 256 (ar, hydra), each code in turn
#   bash scripts/gpu/measure.sh 26  # the same comparison for the engine at concurrency 1/16/64 (ar, auto; REPEATS=2 for two rounds)
#   bash scripts/gpu/measure.sh 27  # all GPU tests (TP, dynamic trees, beams, joint training...); the engine at --tp 1 against
#                                   # none (issue 24); the batch-64 scheduler's host profile, the working tree and .old (issue 23)
#   bash scripts/gpu/measure.sh 28  # all 80 prompts x 256 (ar, hydra), compiled per-layer pieces (the default) against --no-compile
source scripts/gpu/env.sh
R=/tmp/res; mkdir -p $R
quiet() { grep -v -E "run\]|run, |cell\]|cell, |req\]|req, |^\s*$|triton_mm|AUTOTUNE" ; }
case "${1:-1}" in
1)
  echo "== golden, float32"; timeout 120 python3 -m medusa.cli bench --modes ar,medusa,hydra --dtype float32 --limit 4 --max-new-tokens 128 --name golden-float32-gpu --out $R 2>&1 | quiet | tail -9
  echo "== full"; timeout 300 python3 -m medusa.cli bench --modes ar,medusa,hydra --max-new-tokens 256 --name mt_bench-full-gpu --out $R 2>&1 | quiet | tail -9
  ;;
2)
  echo "== concurrency"; timeout 170 python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,spec --max-new-tokens 128 --out $R 2>&1 | quiet | tail -14
  echo "== step cost, default model shape"; timeout 60 python3 -m medusa.cli bench --step-cost --shape smollm2-135m --budget 1 --out $R 2>&1 | quiet | tail -9
  ;;
3)
  echo "== profile (graphs)"; timeout 150 python3 scripts/gpu/profile_step.py --out $R/profile-graphs.json 2>&1 | tail -8
  echo "== profile (graphs + torch.compile default)"; timeout 200 python3 scripts/gpu/profile_step.py --compile default --out $R/profile-compile.json 2>&1 | quiet | tail -8
  echo "== decode, torch.compile default"; MEDUSA_COMPILE_MODE=default timeout 200 python3 -m medusa.cli bench --modes ar,medusa,hydra --compile --limit 10 --max-new-tokens 256 --name mt_bench-compile-gpu --out $R 2>&1 | quiet | tail -9
  ;;
4)
  echo "== full, torch.compile"; timeout 330 python3 -m medusa.cli bench --modes ar,medusa,hydra --compile --max-new-tokens 256 --name mt_bench-full-compile-gpu --out $R 2>&1 | quiet | tail -9
  echo "== concurrency, adaptive"; timeout 200 python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,auto --max-new-tokens 128 --name concurrency-auto-gpu --out $R 2>&1 | quiet | tail -14
  ;;
5)
  [ "${GPU_TESTS:-}" = none ] || echo "== GPU tests"; [ "${GPU_TESTS:-}" = none ] || timeout 240 python3 -m pytest -q -s -x ${GPU_TESTS:-tests/gpu} 2>&1 | grep -v "^{" | tail -8
  echo "== concurrency, graphs"; timeout ${TABLE_TIMEOUT:-420} python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,spec,auto --requests 128 --max-new-tokens 128 --name concurrency-graphs-gpu --out $R 2>&1 | quiet | tail -18
  python3 -c "
import json; d=json.load(open('$R/concurrency-graphs-gpu.json'))
for r in d['rows']: print(r['mode'], r['concurrency'], r['tokens_per_s'], r.get('speedup_vs_ar'), r.get('mean_accepted'), r['engine_steps'], r['engine_time_s'], r['prefill_forwards'], r['seconds'])"
  ;;
6)
  echo "== decode, 20 prompts x 256"; timeout 400 python3 -m medusa.cli bench --modes ar,medusa,hydra --limit 20 --max-new-tokens 256 --name mt_bench-20-gpu --out $R 2>&1 | quiet | tail -9
  ;;
7)
  echo "== GPU tests"; timeout 240 python3 -m pytest -q -s -x ${GPU_TESTS:-tests/gpu} 2>&1 | grep -v "^{" | tail -8
  echo "== concurrency 64, ar vs auto alternating"; timeout 330 python3 -m medusa.cli bench --concurrency 64 --modes ar,auto --requests 256 --repeats ${REPEATS:-3} --max-new-tokens 128 --name concurrency64-alternating-gpu --out $R 2>&1 | quiet | tail -8
  ;;
8)
  echo "== engine host profile"; timeout 300 python3 scripts/gpu/profile_engine.py 2>&1 | tee $R/profile-engine-gpu.txt | grep -v "^$" | head -90
  ;;
9)
  echo "== attention kernels"; timeout 150 python3 scripts/gpu/attention_bench.py --out $R/attention-bench.json 2>&1 | tail -26
  echo "== profile, SDPA attention"; MEDUSA_ATTENTION=sdpa timeout 60 python3 scripts/gpu/profile_step.py --out $R/profile-step-sdpa.json 2>&1 | tail -4
  echo "== profile, auto attention, per operator"; timeout 100 python3 scripts/gpu/profile_step.py --ops --out $R/profile-step-auto.json 2>&1 | grep -v "^{" | tail -40
  ;;
10)
  echo "== GPU tests of the kernels"; timeout 100 python3 -m pytest -q -x tests/gpu/test_graphs.py -k "topk or triton or graphed_spec" 2>&1 | tail -4
  echo "== attention kernels"; timeout 90 python3 scripts/gpu/attention_bench.py --out $R/attention-bench-triton.json 2>&1 | tail -26
  for A in auto triton; do
    echo "== profile, $A attention"; MEDUSA_ATTENTION=$A timeout 50 python3 scripts/gpu/profile_step.py --heads ar,hydra --out $R/profile-step-$A.json 2>&1 | grep '^| '
  done
  for A in auto triton; do
    echo "== all 80 prompts, $A attention"; MEDUSA_ATTENTION=$A timeout 120 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-attention-$A-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
  done
  ;;
11)
  echo "== GPU tests"; timeout 300 python3 -m pytest -q -x tests/gpu 2>&1 | tail -4
  echo "== attention kernels, long spans"; timeout 200 python3 scripts/gpu/attention_bench.py --kv 2048,4096 --out $R/attention-bench-spans.json 2>&1 | tail -26
  ;;
12)
  # prompts: 80 held-out ShareGPT first turns of the distillation mix, carried in .gpu/c (copied to /tmp/m), made with
  #   python scripts/tree_acceptance.py --dataset heldout:sharegpt_first_turns --limit 80 --dump-prompts .gpu/c/sharegpt-heldout-80.jsonl
  P=${PROMPTS:-/tmp/m/sharegpt-heldout-80.jsonl}
  for A in auto torch; do
    echo "== held-out ShareGPT, $A attention"; MEDUSA_ATTENTION=$A timeout 130 python3 -m medusa.cli bench --dataset $P --modes ar,hydra --max-new-tokens 256 --name sharegpt-heldout-80-attention-$A-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
  done
  echo "== concurrency, auto"; timeout 270 python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,auto --repeats 2 --max-new-tokens 128 --name concurrency-auto-attention-gpu --out $R 2>&1 | quiet | tail -12
  ;;
13)
  echo "== GPU tests"; timeout 150 python3 -m pytest -q -x tests/gpu 2>&1 | tail -4
  echo "== attention kernels"; timeout 190 python3 scripts/gpu/attention_bench.py --kv 256,1024,2048,4096 --out $R/attention-bench-split.json 2>&1 | grep -v "^  (" | tail -50
  echo "== profile, auto attention"; timeout 45 python3 scripts/gpu/profile_step.py --heads ar,hydra --out $R/profile-step-split.json 2>&1 | grep '^| '
  for A in auto torch; do
    echo "== all 80 prompts, $A attention"; MEDUSA_ATTENTION=$A timeout 85 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-split-$A-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
  done
  ;;
17)
  echo "== GPU tests"; timeout 150 python3 -m pytest -q -x tests/gpu/test_graphs.py -k "topk or graphed_spec or triton" 2>&1 | tail -3
  echo "== draft top-k"; timeout 100 python3 scripts/gpu/step_ops_bench.py --only draft --out $R/step-ops-bench-split-topk.json 2>&1 | grep -v "^=="
  for C in 1024 0; do
    echo "== profile, MEDUSA_TOPK_CHUNK=$C"; MEDUSA_TOPK_CHUNK=$C timeout 45 python3 scripts/gpu/profile_step.py --heads ar,hydra --out $R/profile-step-topk-$C.json 2>&1 | grep '^| '
  done
  for C in 1024 0; do
    echo "== all 80 prompts, MEDUSA_TOPK_CHUNK=$C"; MEDUSA_TOPK_CHUNK=$C timeout 90 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-topk-$C-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
  done
  ;;
18)
  # the base commit's package, its shipped heads taken from this tree's (the same files)
  [ -d .old/medusa ] && ln -sfn $PWD/medusa/assets .old/medusa/assets
  echo "== GPU tests"; timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -x ${GPU_TESTS:-tests/gpu} 2>&1 | tail -3
  for V in new old; do
    P=$PWD; [ $V = old ] && P=$PWD/.old
    echo "== profile, $V code"; PYTHONPATH=/tmp/site:$P timeout 60 python3 scripts/gpu/profile_step.py --heads ar,hydra --ops --top 150 --out $R/profile-ops-$V.json 2>&1 | grep '^| '
  done
  for V in new old; do
    P=$PWD; M=ar,hydra,hydra:$PWD/medusa/assets/heads/hydra/tree128.json; [ $V = old ] && P=$PWD/.old M=ar,hydra
    echo "== all 80 prompts, $V code"; (cd $P && PYTHONPATH=/tmp/site:$P timeout 130 python3 -m medusa.cli bench --modes $M --max-new-tokens 256 --name mt_bench-80-$V-gpu --out $R 2>&1) | quiet | grep -E '^\| (ar|hydra)'
  done
  ;;
19)
  echo "== concurrency, auto"; timeout 300 python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,auto --repeats 2 --max-new-tokens 128 --name concurrency-auto-gpu --out $R 2>&1 | quiet | tail -12
  ;;
20)
  # profile_step.py takes heads folders with their own tree: the shipped Hydra++ heads with tree128 as theirs
  T=$PWD/medusa/assets/heads/hydra/tree128.json; H=/tmp/hydra-tree128
  rm -rf $H && cp -r medusa/assets/heads/hydra $H && python3 -c "
import json; h = json.load(open('$H/heads.json')); h['tree'] = json.load(open('$T'))['paths']; json.dump(h, open('$H/heads.json', 'w'))"
  echo "== profile tree128"; timeout 70 python3 scripts/gpu/profile_step.py --heads ar,hydra,$H --out $R/profile-step-tree128.json 2>&1 | grep '^| '
  echo "== 80 prompts"; timeout 140 python3 -m medusa.cli bench --modes ar,hydra:$T,hydra --max-new-tokens 256 --name mt_bench-80-new-b-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra)'
  echo "== engine, tree128"; timeout 120 python3 -m medusa.cli bench --concurrency 1,4 --modes ar,spec --tree $T --repeats 2 --max-new-tokens 128 --name concurrency-tree128-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|spec)'
  ;;
21)
  echo "== GPU tests"; timeout ${TEST_TIMEOUT:-220} python3 -m pytest -q -x ${GPU_TESTS:-tests/gpu} 2>&1 | tail -3
  T=$PWD/medusa/assets/heads/hydra/tree128.json
  M=${MODES:-ar,hydra,hydra:+lookup8,hydra:+lookup16,hydra:$T,hydra:$T+lookup16,hydra:$T+lookup32}
  echo "== all 80 prompts"; timeout ${BENCH_TIMEOUT:-330} python3 -m medusa.cli bench --modes $M --max-new-tokens 256 --name mt_bench-80-lookup-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra)'
  ;;
22)
  for T in ${TREES:-default +lookup16}; do
    A=; [ $T != default ] && A="--tree $T"
    echo "== concurrency, auto, tree $T"; timeout ${CONC_TIMEOUT:-280} python3 -m medusa.cli bench --concurrency ${LEVELS:-1,4,16,64} --modes ar,auto --repeats 2 --max-new-tokens 128 $A --name concurrency-auto-${T#+}-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|auto)'
  done
  ;;
23)
  echo "== GPU tests"; timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -x tests/gpu/test_bench_gpu.py tests/gpu/test_graphs.py -k "not test_graphed_spec_equals_eager_ar" 2>&1 | tail -2
  echo "== all 80 prompts"; timeout 170 python3 -m medusa.cli bench --modes ar,hydra,hydra:+lookup0,hydra:+lookup12 --max-new-tokens 256 --name mt_bench-80-lookup-b-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra)'
  ;&
24)
  [ "$1" = 24 ] && N=-c || N=
  echo "== engine, concurrency 1, 80 requests"; timeout 150 python3 -m medusa.cli bench --concurrency 1 --requests 80 --modes ar,spec,auto --max-new-tokens 256 --name concurrency-1-80-lookup$N-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|spec|auto)'
  echo "== engine, concurrency 1-64"; timeout 120 python3 -m medusa.cli bench --concurrency 1,4,16,64 --modes ar,auto --repeats 2 --max-new-tokens 128 --name concurrency-auto-lookup-b$N-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|auto)'
  ;;
25|26)
  # the base commit's package (.old, carried: `git archive BASE medusa ':(exclude)medusa/assets' | tar -x -C .old`),
  # with its own heads.json and trees (also carried: `git archive BASE medusa/assets ':(exclude)*.safetensors'`),
  # the weights linked from this tree's (the same files); its GGUF cache apart (the base caches float32, this tree float16)
  for f in medusa/assets/heads/*/heads.safetensors; do ln -sf $PWD/$f .old/$f; done
  if [ "$1" = 25 ]; then
    echo "== GPU tests"; timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -x ${GPU_TESTS:-tests/gpu} 2>&1 | tail -3
    for V in new old; do
      P=$PWD C=/tmp/mc; [ $V = old ] && P=$PWD/.old C=/tmp/mc-old
      echo "== all 80 prompts, $V code"; (cd $P && MEDUSA_CACHE=$C PYTHONPATH=/tmp/site:$P timeout 150 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-core-$V-gpu --out $R 2>&1) | quiet | grep -E '^\| (ar|hydra)'
    done
  else
    for V in new old; do
      P=$PWD C=/tmp/mc; [ $V = old ] && P=$PWD/.old C=/tmp/mc-old
      echo "== engine, concurrency 1/16/64, $V code"; (cd $P && MEDUSA_CACHE=$C PYTHONPATH=/tmp/site:$P timeout ${CONC_TIMEOUT:-170} python3 -m medusa.cli bench --concurrency 1,16,64 --modes ar,auto --requests ${REQUESTS:-512} --repeats ${REPEATS:-1} --max-new-tokens 128 --name concurrency-core-$V-gpu --out $R 2>&1) | quiet | grep -E '^\| (ar|auto)'
    done
  fi
  ;;
27)
  ROOT=$PWD
  for f in medusa/assets/heads/*/heads.safetensors; do [ -d .old ] && ln -sf $PWD/$f .old/$f; done
  # all of tests/gpu: TP at --tp 1, the accept kernel's per-row tables, dynamic trees, beams, joint training
  echo "== GPU tests"; timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -8
  for T in "" "--tp 1"; do
    echo "== engine ${T:-without --tp}"; timeout 150 python3 -m medusa.cli bench --concurrency 1,16 --modes ar,spec --requests 64 \
      --max-new-tokens 128 $T --name concurrency-tp${T#--tp }-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|spec)'
  done
  for V in new old; do
    P=$PWD C=/tmp/mc; [ $V = old ] && P=$PWD/.old C=/tmp/mc-old
    echo "== scheduler host profile at batch 64, $V code"; (cd $P && MEDUSA_CACHE=$C PYTHONPATH=/tmp/site:$P timeout 150 \
      python3 $ROOT/scripts/gpu/profile_engine.py --top 14 2>&1) | tee $R/profile-engine-$V.txt | grep -v "^$" | head -60
  done
  ;;
28)
  for C in "" "--no-compile"; do
    echo "== all 80 prompts ${C:-compiled}"; timeout 250 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 $C \
      --name mt_bench-80-compile${C:+-off}-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra)'
  done
  ;;
4|15|16)
  # the prompt files are carried in .gpu/c/prompts (copied to /tmp/m/prompts with the model part)
  export MODEL=/tmp/m/smollm2.gguf PROMPTS=/tmp/m/prompts WORK=/tmp/heads_run HEADS=hydra DISTILL_SEED=3 SAMPLE_FRACTION=0.5 \
    INIT_HEADS=hydra HYDRA_LAYERS=${HYDRA_LAYERS:-3} HYDRA_PREFIX=${HYDRA_PREFIX:-1536} HYDRA_LR=6e-4 DRAFT_VOCAB=32768
  case $1 in
  14) DISTILL_SECONDS=${DISTILL_SECONDS:-300} timeout 480 bash scripts/train_default_heads.sh 1 ;;
  15) HYDRA_SECONDS=${HYDRA_SECONDS:-420} timeout 560 bash scripts/train_default_heads.sh 2a
      # the GPU tool returns files of at most 16 MiB, and grown heads weigh more: in parts (cat them to rejoin)
      split -b 15000000 -d $WORK/hydra/heads.safetensors $OUT/grown.heads.safetensors.part-; cp $WORK/hydra/heads.json $OUT/grown.heads.json
      cp $WORK/hydra/train.json $R/grown.train.json ;;
  16)
    echo "== all 80 prompts, shipped heads"; timeout 100 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-shipped-heads-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
    echo "== step profile with operators, shipped heads"; timeout 70 python3 scripts/gpu/profile_step.py --heads ar,hydra --ops --out $R/profile-ops-shipped.json 2>&1 | grep -E '^\| |^  aten'
    # the grown heads' accuracy and trees (no 8-prompt generate: the 80 prompts below measure them); they replace the assets here
    MTBENCH=/nonexistent timeout 230 bash scripts/train_default_heads.sh 2b
    cp $WORK/hydra.accuracy.json $R/grown.accuracy.json; cp -r $WORK/hydra.trees $R/grown.trees
    cp medusa/assets/heads/hydra/heads.json $OUT/grown-tree.heads.json
    echo "== all 80 prompts, grown heads"; timeout 100 python3 -m medusa.cli bench --modes ar,hydra --max-new-tokens 256 --name mt_bench-80-grown-heads-gpu --out $R 2>&1 | quiet | grep -E '^\| (ar|hydra) '
    ;;
  esac
  ;;
esac
tar -czf $OUT/results-${1:-1}.tgz -C $R .
