"""Parameter groups (attention vs non-attention), frozen groups, token-space schedules."""

import math

import pytest
import torch

from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.optim import GroupSpec, TokenSchedule, build_optimizer, param_groups, scale_lr


def test_groups_split_attention_from_everything_else():
    model = build_model(get_preset("debug"), seed=0)
    groups = {g["name"]: g for g in param_groups(model, attention=GroupSpec(3e-4, 0.1),
                                                 non_attention=GroupSpec(1e-8, 0.1))}
    names = {id(p): n for n, p in model.named_parameters()}
    attn = {names[id(p)] for p in groups["attention"]["params"]}
    rest = {names[id(p)] for p in groups["non_attention"]["params"]}
    assert "layers.0.self_attn.q_proj.weight" in attn and "layers.0.self_attn.k_norm.weight" in attn
    assert all(".self_attn." in n for n in attn)
    for n in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.1.mlp.router.weight",
              "layers.1.mlp.experts.gate_proj", "layers.0.input_layernorm.weight"):
        assert n in rest
    assert len(attn) + len(rest) == len(list(model.parameters()))
    assert groups["attention"]["peak_lr"] == 3e-4 and groups["non_attention"]["peak_lr"] == 1e-8


def test_tied_parameter_counted_once():
    model = build_model(get_preset("debug_dense"), seed=0)
    groups = param_groups(model, attention=GroupSpec(1e-3), non_attention=GroupSpec(1e-3))
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))  # parameters() already deduplicates the tied head


def test_zero_lr_group_is_frozen_and_allocates_no_state():
    model = build_model(get_preset("debug"), seed=0)
    opt = build_optimizer(model, attention=GroupSpec(1e-3, 0.1), non_attention=GroupSpec(0.0, 0.1))
    model(torch.randint(0, 500, (2, 8))).sum().backward()
    opt.step()
    frozen = [p for n, p in model.named_parameters() if ".self_attn." not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(id(p) not in {id(q) for q in opt.state} for p in frozen)
    assert len(opt.state) == sum(1 for n, _ in model.named_parameters() if ".self_attn." in n)


@pytest.mark.parametrize("decay,at,expect", [
    ("constant", 150, 1.0), ("constant", 1000, 1.0), ("linear", 49, 50 / 101),
    ("linear", 100, 1.0), ("linear", 550, 0.5), ("linear", 1000, 0.0),
    ("cosine", 550, 0.5), ("cosine", 1000, 0.0),
    ("wsd", 850, 1.0), ("wsd", 950, 0.5), ("wsd", 1000, 0.0),
])
def test_schedule_values(decay, at, expect):
    s = TokenSchedule(warmup_tokens=100, total_tokens=1000, decay=decay, decay_fraction=0.1)
    assert s.factor(at) == pytest.approx(expect, abs=1e-9)


def test_warmup_is_linear_in_tokens():
    s = TokenSchedule(warmup_tokens=99, total_tokens=1000)
    assert s.factor(0) == pytest.approx(0.01) and s.factor(49) == pytest.approx(0.5) and s.factor(99) == 1.0


def test_sqrt_batch_scaling():
    assert scale_lr(3e-4, 4_000_000, 1_000_000) == pytest.approx(6e-4)
    assert scale_lr(3e-4, 250_000, 1_000_000) == pytest.approx(1.5e-4)
    assert math.isclose(scale_lr(1.0, 2, 1), math.sqrt(2))


def test_fused_default_matches_foreach_with_two_learning_rates():
    """The default AdamW kernel (fused, the fastest on CPU) must update like the foreach one,
    per group (different lr and weight decay per group)."""
    models = [build_model(get_preset("debug"), seed=0) for _ in range(2)]
    opts = [build_optimizer(m, attention=GroupSpec(1e-2, 0.1), non_attention=GroupSpec(3e-3, 0.0),
                            implementation=impl) for m, impl in zip(models, ("fused", "foreach"))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    x = torch.randint(0, 500, (2, 16))
    x[:, ::4] = models[0].config.mask_token_id  # the separate [MASK] embedding gets a gradient too
    for _ in range(3):
        for m, opt in zip(models, opts):
            m(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    init = build_model(get_preset("debug"), seed=0)
    moved = sum(not torch.equal(a, b) for a, b in zip(models[0].parameters(), init.parameters()))
    assert moved == len(list(init.parameters()))  # every parameter was updated


def test_switching_the_adamw_kernel_mid_run_continues_the_same_update():
    """``set_adamw_implementation`` (the ``auto`` choice, or a config over a resumed checkpoint's
    flags) after steps were taken: the switched optimizer keeps updating exactly like one that
    used the new kernel from the start, and the step counter lives where that kernel reads it."""
    from rnd1.optim import set_adamw_implementation

    models = [build_model(get_preset("debug"), seed=0) for _ in range(2)]
    switched, fused = [build_optimizer(m, attention=GroupSpec(1e-2, 0.1), non_attention=GroupSpec(3e-3, 0.0),
                                       implementation=impl) for m, impl in zip(models, ("auto", "fused"))]
    assert switched.defaults["foreach"] and not switched.defaults["fused"]  # auto starts as foreach
    x = torch.randint(0, 500, (2, 16))
    for step in range(4):
        if step == 2:
            set_adamw_implementation(switched, "fused")
        for m, opt in zip(models, (switched, fused)):
            m(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert all(g["fused"] and not g["foreach"] for g in switched.param_groups)
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 4 for s in switched.state.values())
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match="expected one of"):
        set_adamw_implementation(switched, "fast")


def test_adamw_candidates_step_copies_and_name_what_they_measure():
    """The start-up measurement steps copies (the model is untouched) of at most
    ``max_elements``, and its key says how much of the model it covered."""
    from rnd1.optim import adamw_tuning_candidates

    model = build_model(get_preset("debug"), seed=0)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    key, names, make = adamw_tuning_candidates(params)
    assert key.startswith(f"{len(params)} tensors, {sum(p.numel() for p in params)} elements, torch.float32")
    candidates = make()
    assert set(candidates) == set(names) == {"fused", "foreach"}
    for step in candidates.values():
        step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    small, _, _ = adamw_tuning_candidates(params, max_elements=params[0].numel())
    assert small.startswith(f"1 tensors (of {len(params)}), {params[0].numel()} elements")
