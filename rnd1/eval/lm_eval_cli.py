"""``rnd1-lm-eval``: lm_eval's command line with ``--model rnd1`` registered.

Its own module, apart from ``rnd1.eval.harness``, so that a missing optional extra is one line and
exit 2 instead of an import traceback: ``rnd1-lm-eval`` is installed with rnd1 whether or not
lm-evaluation-harness is (``pip install -e ".[eval]"``). ``--help`` starts with how to name this
model, which lm_eval's own help cannot know.
"""

from __future__ import annotations

import sys

USAGE = ("rnd1-lm-eval: lm_eval's command line with --model rnd1 registered, e.g.\n"
         "  rnd1-lm-eval --model rnd1 --model_args checkpoint=outputs/run/checkpoint,tokenizer=byte "
         "--tasks arc_easy\n"
         "model args (rnd1/eval/harness.py): checkpoint, tokenizer, model, objective, mc_samples, gen_length, "
         "gen_steps, block_length, strategy, kv_cache, cache_refresh, suffix_window, threshold, factor, parallel, "
         "batch_size, seed.\n"
         "lm_eval's own options follow.\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from rnd1.eval import harness
    except ImportError as e:
        print(f"error: rnd1-lm-eval needs lm-evaluation-harness ({e.name or e}): pip install -e '.[eval]'",
              file=sys.stderr)
        return 2
    if not args or "-h" in args or "--help" in args:
        sys.stdout.write(USAGE + "\n")
        if not args:
            return 2
    harness.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
