#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, the node list) and sets up torch.distributed itself.
#
#   sbatch --nodes 32 --gpus-per-node 8 scripts/slurm_train.sh configs/paper/mardini-s/05_joint_model.yaml
#
# Resume after a preemption or a crash: submit the same command; it passes --ckpt_path last. Two minutes before the
# time limit SLURM sends SIGUSR1: at the end of that step, on every rank together (mardini.lit.preemption), train.py
# saves Lightning's hpc_ckpt_N.ckpt into the stage's checkpoint folder and requeues the job, which resumes from the
# checkpoint of the highest step there (mardini.cli_resume.resume_checkpoint). SIGTERM (preemption, scancel, the time
# limit) saves the same checkpoint at the end of the step and exits with status 143, so `sbatch --wait ... || break`
# stops at an unfinished stage.
# A sweep gives each job its own folder; two jobs in one folder are refused (fit.lock, README "One fit per folder").
# In a job array, quote the task id so that each task expands its own (README "Sweeps"):
#   sbatch --array 0-3 scripts/slurm_train.sh STAGE.yaml --trainer.logger.init_args.version 'task${SLURM_ARRAY_TASK_ID}'
# To start a stage over, give it a new folder (--trainer.logger.init_args.save_dir or name) or delete its folder; do
# not pass --ckpt_path null here: a requeue reruns the same arguments, and --ckpt_path null refuses to start while
# the preemption checkpoint is there (Lightning would resume from it), so the requeued job would exit.
#
# Python: $PYTHON if set, else the checkout's .venv/bin/python (what make builds) if there, else `python` on the PATH
# (an activated conda environment). train.py is the checkout's: $MARDINI_ROOT if set, else the folder above this
# script's, else (sbatch runs a copy of the script from its spool folder) the one scontrol names as the job's
# command, else the folder sbatch was called from. Config paths and the configs' data and output paths stay
# relative to the folder the job runs in (sbatch's: the one it was called from, or --chdir).
#SBATCH --job-name=mardini
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@120
set -euo pipefail
CONFIG=${1:?usage: sbatch [--nodes N] scripts/slurm_train.sh CONFIG.yaml [extra CLI args]}
shift
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS=${SLURM_GPUS_PER_NODE:-8}
script=  # this script's own path under sbatch, which runs a copy of it
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null \
           | awk -F'Command=' 'NF > 1 {split($2, a, " "); print a[1]; exit}' || true)
fi
if [[ -n ${MARDINI_ROOT:-} ]]; then
  places=("$MARDINI_ROOT")
else
  places=("$(dirname "${BASH_SOURCE[0]}")/.." ${script:+"$(dirname "$script")/.."}
          ${SLURM_SUBMIT_DIR:+"$SLURM_SUBMIT_DIR"})
fi
ROOT=
for dir in "${places[@]}"; do
  if [[ -f $dir/train.py ]]; then ROOT=$(cd "$dir" && pwd); break; fi
done
if [[ -z $ROOT ]]; then
  echo "slurm_train.sh: error: no train.py in ${places[*]}: set MARDINI_ROOT to the checkout" \
       "(sbatch --export=ALL,MARDINI_ROOT=/path/to/mardini-lightning ...)" >&2
  exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
# Extra arguments (e.g. --config configs/paper/fsdp.yaml) come before the node
# and device counts, so that an overlay config cannot reset them to its own.
srun "$PYTHON" "$ROOT/train.py" fit --config "$CONFIG" --ckpt_path last "$@" \
  --trainer.num_nodes "$NODES" --trainer.devices "${GPUS##*:}"
