#!/usr/bin/env bash
# Launch training with torchrun (through rnd1.launch), in torchtitan's manner.
#
#   ./run_train.sh                                   # default: train_configs/debug_model.toml, 1 process
#   NPROC=2 ./run_train.sh                           # 2 processes (default config: debug_model_ep.toml, EP 2)
#   CONFIG_FILE=train_configs/debug_ar.toml ./run_train.sh --training.steps=50
#
# Environment: CONFIG_FILE, NPROC (or NGPU) processes per node, and for several nodes NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT (or RDZV_ENDPOINT for c10d rendezvous). RND1_STOP_GRACE_S:
# how long the launcher waits for workers saving after a stop signal (default: as long as they
# take; the scheduler's own deadline applies). Extra arguments are passed to `python -m rnd1.train`
# as config overrides (--section.key=value).
set -euo pipefail
cd "$(dirname "$0")"

NPROC=${NPROC:-${NGPU:-1}}
if [[ -z "${CONFIG_FILE:-}" ]]; then
  if [[ "$NPROC" -gt 1 ]]; then CONFIG_FILE=./train_configs/debug_model_ep.toml; else CONFIG_FILE=./train_configs/debug_model.toml; fi
fi
NNODES=${NNODES:-1}

if [[ "$NNODES" -gt 1 ]]; then
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-${MASTER_ADDR:?set MASTER_ADDR or RDZV_ENDPOINT}:${MASTER_PORT:-29500}}
  LAUNCH=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-rnd1}")
else
  LAUNCH=(--standalone --nnodes=1)
fi

# With NPROC > 1 each process gets one OpenMP thread, as torchrun would set (here without its
# banner); a single process keeps every core. OMP_NUM_THREADS, when set, wins.
if [[ "$NPROC" -gt 1 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

# rnd1.launch is torchrun (same options) whose exit code is the trainer's: 2 on bad input, after
# the trainer's one-line message and nothing else.
# exec: a signal to this script (SIGTERM, SIGUSR1, SIGHUP, SIGQUIT, Ctrl-C) reaches the launcher
# itself; the workers save and the exit code is 0 (see "What survives what" in README.md).
exec python -m rnd1.launch "${LAUNCH[@]}" --nproc_per_node="$NPROC" \
  -m rnd1.train --config "$CONFIG_FILE" "$@"
