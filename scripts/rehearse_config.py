"""Rehearse configs on CPU before a cluster launch: each file runs shrunk only in size (tiny model,
byte tokenizer, 4 steps, at most 4 processes) with every other setting kept, and its losses are
compared with a 1-process eager run of the same shrunken config (rnd1/tools/rehearsal.py).

    python scripts/rehearse_config.py train_configs/qwen3_30b_a3b_rnd1.toml
    python scripts/rehearse_config.py train_configs/*.toml train_configs/recipes/*.toml
"""

import sys

from rnd1.tools.rehearsal import main

if __name__ == "__main__":
    sys.exit(main())
