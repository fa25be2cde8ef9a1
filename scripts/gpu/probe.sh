# First look on a GPU: the graphs golden test, then our ar / spec (eager, graphs, compiled) on 5 MT-Bench prompts.
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | grep -E "^E |passed|failed|\{" | head -20
P=medusa/bench/datasets/mt_bench/question.jsonl
for args in "--mode ar --no-graphs" "--mode ar" "--mode spec --tree tree16" "--mode spec --tree tree64" "--mode ar --compile" "--mode spec --tree tree64 --compile"; do
  echo "== $args"
  timeout 200 python3 -m medusa.cli generate --prompt-file $P --limit 5 --json --max-new-tokens 128 $args > $OUT/gen.jsonl 2> $OUT/err.txt || tail -3 $OUT/err.txt
  python3 -c "import json,statistics as s;r=[json.loads(l) for l in open('$OUT/gen.jsonl')];print('tok/s median',round(s.median(x['tokens_per_s'] for x in r[1:]),1),'acc',round(s.mean(x['mean_accepted'] for x in r),2))"
done
