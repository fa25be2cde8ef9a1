# The GPU benchmark set of BENCHMARKS.md, for a lent GPU machine (repo root as working dir,
# the default model parts carried as scripts/gpu/env.sh expects). Results land in
# benchmarks/results/ and are copied to $OUT (when set) so they come back.
#   bash benchmarks/gpu.sh decode    # MT-Bench first turns: hf, ar, medusa, hydra (about 8 min)
#   bash benchmarks/gpu.sh full      # all 80 prompts x 256 tokens, our modes only (hf is too slow for one call)
#   bash benchmarks/gpu.sh step      # step cost of the llama-7b and llama3-8b shapes, graphs on and off
#   bash benchmarks/gpu.sh conc      # engine throughput at concurrency 1..64
source scripts/gpu/env.sh
R=benchmarks/results
case "${1:-decode}" in
  decode) medusa bench --dataset mt_bench --modes hf,ar,medusa,hydra --max-new-tokens 256 --limit 40 ;;
  full)   medusa bench --dataset mt_bench --modes ar,medusa,hydra --max-new-tokens 256 --name mt_bench-full-$(python3 -c "import torch,re;print(re.sub('[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))") ;;
  trees)  medusa bench --dataset mt_bench --modes ar,medusa:chain,medusa:tree16,medusa:tree32,medusa:tree64 --max-new-tokens 256 --limit 20 --name mt_bench-trees-gpu ;;
  step)   medusa bench --step-cost --shape llama-7b && medusa bench --step-cost --shape llama3-8b --budget 1 ;;
  conc)   medusa bench --concurrency 1,4,16,64 --modes ar,spec --max-new-tokens 128 --limit 80 ;;
  *) echo "usage: bash benchmarks/gpu.sh decode|full|trees|step|conc"; exit 2 ;;
esac
rc=$?
[ -n "$OUT" ] && mkdir -p "$OUT/results" && cp $R/* "$OUT/results/" 2>/dev/null
exit $rc
