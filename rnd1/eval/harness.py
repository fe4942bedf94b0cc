"""lm-evaluation-harness adapter: ``--model rnd1``.

    python -m rnd1.eval.harness --model rnd1 --model_args checkpoint=outputs/run/checkpoint,tokenizer=byte \\
        --tasks arc_easy --num_fewshot 0            # the lm_eval CLI, with this model registered
    python scripts/eval.py --checkpoint ... --preset rnd1_table41

(``lm_eval`` itself cannot import third-party models, so this module registers the class and
then hands over to lm_eval's own command line.) lm-eval is an optional extra
(``pip install -e ".[eval]"``); training never imports this module.

Scoring: ``loglikelihood`` uses the Monte Carlo ELBO for diffusion models (``mc_samples`` masks
per request, low-discrepancy t, only continuation tokens masked) and the exact sum for AR
checkpoints; ``generate_until`` uses the diffusion sampler (batched, ragged prompts) and cuts at
the stop strings, with the sampler settings given as model args (``kv_cache``, ``cache_refresh``,
``suffix_window``, ``threshold``, ``factor``, ``parallel``, ``block_length``, ``gen_steps``, ``strategy``). The defaults
are ``rnd1.generate.FAST_DEFAULTS`` (dual cache, confidence threshold 0.9, blocks of 32, DPad's
suffix window of 32: on the task model it loses nothing against uncached one-token-per-forward
sampling at gen lengths 64, 256 and 1,024, at 14x-247x its speed; the threshold rule because it
lost less than the factor rule on the previous task model; docs/sampling.md); ``factor=1.0`` switches to the factor rule and
``kv_cache=none,parallel=False,suffix_window=0`` is the exact sampler.

Every result carries the record of what produced it (``rnd1.eval.record``): lm_eval puts
``get_model_info()`` into its results' ``config``, so the CLI's output JSON holds the sampler
settings, seed, model hash, package versions and device next to the scores.
"""

from __future__ import annotations

import sys

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("rnd1.eval.harness needs lm-evaluation-harness: pip install -e '.[eval]'") from e

from rnd1.data.tokenizer import load_tokenizer
from rnd1.checkpoint.load import load_for_inference, recorded_objective
from rnd1.diffusion.objective import get_objective
from rnd1.eval.likelihood import ar_loglikelihood, elbo_loglikelihood
from rnd1.generate import FAST_DEFAULTS, ar_generate, diffusion_generate, fast_kv_cache, parallel_rule


@register_model("rnd1")
class RND1HarnessLM(LM):
    def __init__(self, checkpoint: str = "", tokenizer: str = "byte", model: str = "", objective: str = "",
                 mc_samples: int = 32, gen_length: int = 128, gen_steps: int = 64, block_length: int = 32,
                 strategy: str = "confidence", batch_size: int | str = 8, seed: int = 0, lm=None,
                 kv_cache: str = "auto", cache_refresh: int = 0, threshold: float | None = None,
                 factor: float | None = None, parallel: bool | str = True, suffix_window: int | str = "auto", **_):
        super().__init__()
        self.tok = load_tokenizer(tokenizer)
        if lm is None:
            if not checkpoint:
                raise ValueError("rnd1 harness model: pass checkpoint=<DCP checkpoint or HF folder>")
            objective = objective or recorded_objective(checkpoint)
            lm = load_for_inference(checkpoint, model, objective)
        self.model = lm.eval()
        self.objective = get_objective(objective or "a2d")
        self.mask_id = self.model.config.mask_token_id
        self.mc_samples, self.gen_length, self.gen_steps = int(mc_samples), int(gen_length), int(gen_steps)
        self.block_length, self.strategy = int(block_length), strategy
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.gen = torch.Generator().manual_seed(int(seed))
        self.seed, self.checkpoint = int(seed), checkpoint
        self.kv_cache = fast_kv_cache(self.objective) if kv_cache == "auto" else str(kv_cache)
        self.cache_refresh = int(cache_refresh)
        block_model = getattr(self.objective, "block_size", None) is not None
        if str(suffix_window) == "auto":
            self.suffix_window = 0 if block_model else FAST_DEFAULTS["suffix_window"]
        elif str(suffix_window).isdigit():
            self.suffix_window = int(suffix_window)
        else:
            raise ValueError(f"suffix_window {suffix_window!r}: expected auto or a count >= 0 (0: the whole suffix)")
        if block_model and self.suffix_window:
            raise ValueError(f"suffix_window {self.suffix_window}: {self.objective.name} attends block-causally and "
                             f"reads no later block, so there is no suffix to window (0 or auto)")
        # model args arrive as strings: "None" / "" is no value, "False" / "0" / "no" turns parallel off
        self.threshold, self.factor = parallel_rule(
            None if threshold in (None, "", "None") else float(threshold),
            None if factor in (None, "", "None") else float(factor),
            parallel=str(parallel).strip().lower() not in ("false", "0", "no"))

    def sampler_settings(self) -> dict:
        return {"gen_length": self.gen_length, "gen_steps": self.gen_steps, "block_length": self.block_length,
                "strategy": self.strategy, "kv_cache": self.kv_cache, "cache_refresh": self.cache_refresh,
                "suffix_window": self.suffix_window, "threshold": self.threshold, "factor": self.factor, "temperature": 0.0,
                "mc_samples": self.mc_samples, "objective": self.objective.name}

    def get_model_info(self) -> dict:
        """lm_eval adds this to its results' ``config``: the record of ``rnd1.eval.record``."""
        from rnd1.eval.record import evaluation_record

        return {"rnd1_record": evaluation_record(model=self.model, checkpoint=self.checkpoint,
                                                 sampler=self.sampler_settings(), seeds={"sampler": self.seed},
                                                 device=next(self.model.parameters()).device)}

    # ------------------------------------------------------------------ likelihood
    def _ll(self, context: str, continuation: str) -> tuple[float, bool]:
        ctx, cont = self.tok.encode(context), self.tok.encode(continuation)
        if not ctx:
            ctx = [self.tok.eos_id]
        if not self.objective.masks:
            return ar_loglikelihood(self.model, ctx, cont)
        ll = elbo_loglikelihood(self.model, ctx, cont, mask_id=self.mask_id, objective=self.objective,
                                num_samples=self.mc_samples, generator=self.gen)
        return ll, False  # greedy agreement is not defined for a diffusion ELBO

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [self._ll(*r.args[:2]) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [self._ll("", r.args[0])[0] for r in requests]

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for i in range(0, len(requests), self.batch):
            chunk = requests[i:i + self.batch]
            prompts = [self.tok.encode(r.args[0]) or [self.tok.eos_id] for r in chunk]
            kwargs = [r.args[1] if len(r.args) > 1 else {} for r in chunk]
            length = max(int(k.get("max_gen_toks", self.gen_length)) for k in kwargs)
            if not self.objective.masks:
                res = ar_generate(self.model, prompts, max_new_tokens=length, eos_id=self.tok.eos_id,
                                  vocab_limit=self.tok.vocab_size)
            else:
                block = min(self.block_length, length)
                steps = max(self.gen_steps * length // max(self.gen_length, 1), -(-length // block))
                res = diffusion_generate(self.model, prompts, gen_length=length, steps=steps, mask_id=self.mask_id,
                                         objective=self.objective, block_length=block, strategy=self.strategy,
                                         eos_id=self.tok.eos_id, generator=self.gen, vocab_limit=self.tok.vocab_size,
                                         kv_cache=self.kv_cache, cache_refresh=self.cache_refresh,
                                         suffix_window=self.suffix_window, threshold=self.threshold, factor=self.factor)
            for toks, k in zip(res.tokens, kwargs):
                text = self.tok.decode([t for t in toks if t != self.tok.eos_id])
                until = k.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out.append(text)
        return out


def main(argv=None) -> None:
    """lm_eval's CLI with ``--model rnd1`` available."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
