#!/usr/bin/env bash
# The validation sweep as one worker per (task, budget), run in parallel and merged at the end:
# for a machine with many cores and one accelerator that a single worker leaves mostly idle (each
# worker takes a small slice of the accelerator's memory; identical programs -- the same variant
# under another seed -- compile once, through JAX's persistent compilation cache).
#
#   TASKS="trec6 movie_sentiment" BUDGETS="0.125 1.0" SEEDS="0 1 2 3 4" LIMIT=480 \
#     bash scripts/sweep_parallel.sh runs/sweep
#
# Each worker stops after LIMIT seconds (its finished runs are kept: the store is written after
# every run); a rerun continues where it stopped.
set -u
out=${1:-runs/sweep}
mkdir -p "$out"
: "${TASKS:=trec6 trec50 movie_sentiment tweet_sentiment}" "${BUDGETS:=0.125 1.0}"
: "${SEEDS:=0 1 2 3 4}" "${LIMIT:=480}" "${STEPS:=150}"
: "${VARIANTS:=uniform:qv layerlens_lora spectral_frobenius uniform:all uniform:ffn uniform:qkvo eva adalora spectral_nuclear}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.08}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/layerlens-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 PYTHONUNBUFFERED=1
dirs=()
first=${BUDGETS%% *}
for task in $TASKS; do
  for budget in $BUDGETS; do
    extra=""
    [ "$budget" = "$first" ] && extra="head_only full"  # once per task
    name="${task//:/_}_$budget"
    dirs+=("$out/$name")
    timeout "$LIMIT" python3 scripts/validate_task.py --tasks "$task" --budgets "$budget" \
      --seeds $SEEDS --steps "$STEPS" --variants $VARIANTS $extra --out "$out/$name" \
      > "$out/$name.log" 2>&1 &
  done
done
wait
python3 scripts/validate_task.py --out "$out" --merge "${dirs[@]}" > "$out/merge.log" 2>&1
tail -n 80 "$out/validation.md"
