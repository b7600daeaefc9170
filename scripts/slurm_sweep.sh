#!/usr/bin/env bash
# Step 2 of the addition study as a SLURM job array: N shards (every N-th unit each: a part, or a cell
# range of a part when there are fewer parts than shards or --cell-blocks M is given), then a merge job
# that runs once every shard has succeeded. Shards resume: resubmitting redoes only missing units.
#
#   scripts/slurm_sweep.sh N [step-2 arguments, e.g. --model organism --digits 2]
#
# Environment: PYTHON (default .venv/bin/python), SBATCH_ARGS (extra sbatch options for the shard jobs,
# e.g. "--gres=gpu:1 --time=04:00:00 --partition=gpu"), DRY_RUN=1 (print the sbatch commands, submit nothing).
# Run from the repository root on a filesystem the compute nodes share (the study folder is written there).
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N_SHARDS [step-2 arguments...]" >&2
    exit 2
fi
n=$1
shift
python=${PYTHON:-.venv/bin/python}
step=tasks/general_addition/02_run_interventions.py
args=""
for a in "$@"; do args+="$(printf '%q' "$a") "; done

shard_wrap="$python $step $args--shard \$SLURM_ARRAY_TASK_ID/$n"
merge_wrap="$python $step $args--merge-shards $n"
# shellcheck disable=SC2206
extra=(${SBATCH_ARGS:-})

if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf 'sbatch --parsable --job-name=sweep-shards --array=0-%d' "$((n - 1))"
    [[ ${#extra[@]} -gt 0 ]] && printf ' %s' "${extra[@]}"
    printf ' --wrap %q\n' "$shard_wrap"
    printf 'sbatch --parsable --job-name=sweep-merge --dependency=afterok:<array job id> --wrap %q\n' "$merge_wrap"
    exit 0
fi

job=$(sbatch --parsable --job-name=sweep-shards --array=0-$((n - 1)) "${extra[@]}" --wrap "$shard_wrap")
merge=$(sbatch --parsable --job-name=sweep-merge --dependency=afterok:"${job%%;*}" --wrap "$merge_wrap")
echo "submitted shards as job array $job ($n tasks); merge job $merge runs after all succeed"
