"""Rehearse configs on CPU before a cluster launch: each file runs shrunk only in size (tiny model,
byte tokenizer, 4 steps) at the config's own expert-parallel degree (EP 8: 8 processes) with every
other setting kept, and its losses are compared with a 1-process eager run of the same shrunken
config (rnd1/tools/rehearsal.py).

    python scripts/rehearse_config.py train_configs/qwen3_30b_a3b_rnd1.toml            # EP 8, 8 processes
    python scripts/rehearse_config.py train_configs/qwen3_30b_a3b_rnd1.toml --ep 4 --nproc 8  # EP 4 x FSDP 2
    python scripts/rehearse_config.py train_configs/*.toml train_configs/recipes/*.toml

A layout that cannot run (an EP degree that does not divide the tiny preset's 8 experts, a process
count that is not a multiple of it): one line, exit 2.
"""

import sys

from rnd1.tools.rehearsal import main

if __name__ == "__main__":
    sys.exit(main())
