#!/usr/bin/env bash
# Medusa-2 on a lent GPU machine (after the model parts were carried, see env.sh), in calls of
# at most ~9.5 minutes; /tmp/heads_run is kept between calls on a warm machine, and the results
# come back under $OUT (scripts/train_medusa2.sh says what each stage does):
#   bash scripts/gpu/medusa2.sh 0   # no distilled data carried: distill it (scripts/train_default_heads.sh 1, ~7.5 min)
#   bash scripts/gpu/medusa2.sh 1   # GPU tests of joint training and merged adapters; joint training of medusa2 and hydra2
#   bash scripts/gpu/medusa2.sh 2   # medusa2: accuracy + trees; quality against the original (MT-Bench, held-out data), bf16-vs-fp32 floor
#   bash scripts/gpu/medusa2.sh 3   # hydra2: the same
#   bash scripts/gpu/medusa2.sh 4   # 80 MT-Bench x 256, the original: ar, Medusa-1, Hydra++ with and without its lookup chain
#   bash scripts/gpu/medusa2.sh 5   # 80 x 256, Medusa-2's adapted backbone: ar, Medusa-2
#   bash scripts/gpu/medusa2.sh 6   # 80 x 256, jointly trained Hydra++'s backbone: ar, Hydra-2 with and without the chain; the report
# Distilled data: carry the parts of a stage-1 run as .gpu/d/distill.jsonl.gz.part-* (or run part 0 on this machine).
source scripts/gpu/env.sh
export WORK=/tmp/heads_run MODEL=/tmp/m/smollm2.gguf MTBENCH=/tmp/data/mt_bench/question.jsonl
export DATA_GZ=${DATA_GZ:-.gpu/d/distill.jsonl.gz}
mkdir -p "$WORK"
case "${1:-1}" in
0) WORK=$WORK OUT=$OUT bash scripts/train_default_heads.sh 1 ;;
1)
  echo "== GPU tests (joint)"; timeout 120 python3 -m pytest -q -x tests/gpu/test_joint_gpu.py 2>&1 | tail -4
  echo "== joint training"; M2_SECONDS=${M2_SECONDS:-180} H2_SECONDS=${H2_SECONDS:-180} bash scripts/train_medusa2.sh train 2>&1 | tail -30
  ;;
2) VARIANTS=medusa2 bash scripts/train_medusa2.sh eval 2>&1 | grep -v "^\[" | tail -40 ;;
3) VARIANTS=hydra2 bash scripts/train_medusa2.sh eval 2>&1 | grep -v "^\[" | tail -40 ;;
4) bash scripts/train_medusa2.sh bench1 ;;
5) bash scripts/train_medusa2.sh bench2 ;;
6) bash scripts/train_medusa2.sh bench3; bash scripts/train_medusa2.sh report | tee "$OUT/medusa2-report.md" ;;
*) echo "usage: $0 0|1|2|3|4|5|6" >&2; exit 2 ;;
esac
