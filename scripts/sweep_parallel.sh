#!/usr/bin/env bash
# The validation sweep as one worker per (task, budget, seed group), run in parallel and merged at
# the end: for a machine with many cores and one accelerator that a single worker leaves mostly
# idle (each worker takes a small slice of the accelerator's memory; identical programs -- the
# same variant under another seed -- compile once, through JAX's persistent compilation cache).
#
#   TASKS="trec6 movie_sentiment" BUDGETS="0.125 1.0" SEEDS="0 1 2 3 4" LIMIT=480 \
#     bash scripts/sweep_parallel.sh runs/sweep
#   EPOCHS=3 SEED_GROUPS="0 1 2|3 4" REFERENCE="" bash scripts/sweep_parallel.sh runs/epochs3
#
# SEED_GROUPS splits each (task, budget) into one worker per '|'-separated group of seeds;
# SPLIT_BUDGETS=0 gives each task one worker for all its budgets (fewer processes: on the H100's
# 16 cores, 24 workers spent 240 s compiling their first profile and finished no run in 320 s);
# EPOCHS (> 0) trains that many passes over each task's training split instead of STEPS;
# REFERENCE: the variants run once per task (with the first budget), "" for none.
# Each worker stops after LIMIT seconds (its finished runs are kept: the store is written after
# every run); a rerun continues where it stopped.
set -u
out=${1:-runs/sweep}
mkdir -p "$out"
: "${TASKS:=trec6 trec50 movie_sentiment tweet_sentiment}" "${BUDGETS:=0.125 1.0}"
: "${SEEDS:=0 1 2 3 4}" "${LIMIT:=480}" "${STEPS:=150}" "${EPOCHS:=0}"
: "${SEED_GROUPS:=$SEEDS}"
: "${VARIANTS:=uniform:qv layerlens_lora spectral_frobenius uniform:all uniform:ffn uniform:qkvo eva adalora spectral_nuclear}"
REFERENCE=${REFERENCE-head_only full}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.08}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/layerlens-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 PYTHONUNBUFFERED=1
IFS='|' read -ra groups <<< "$SEED_GROUPS"
dirs=()
first=${BUDGETS%% *}
if [ "${SPLIT_BUDGETS:-1}" = 0 ]; then budget_sets=("$BUDGETS"); else read -ra budget_sets <<< "$BUDGETS"; fi
for task in $TASKS; do
  for budget in "${budget_sets[@]}"; do
    for g in "${!groups[@]}"; do
      extra=""
      [ "${budget%% *}" = "$first" ] && [ "$g" = 0 ] && extra="$REFERENCE"  # once per task
      name="${task//:/_}_${budget// /_}_g$g"
      dirs+=("$out/$name")
      timeout "$LIMIT" python3 scripts/validate_task.py --tasks "$task" --budgets $budget \
        --seeds ${groups[$g]} --steps "$STEPS" --epochs "$EPOCHS" --variants $VARIANTS $extra \
        --out "$out/$name" > "$out/$name.log" 2>&1 &
    done
  done
done
wait
python3 scripts/validate_task.py --out "$out" --merge "${dirs[@]}" > "$out/merge.log" 2>&1
tail -n 80 "$out/validation.md"
