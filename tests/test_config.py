"""Config parsing, overrides, include chains and the error messages users see."""

from pathlib import Path

import pytest

from rnd1.config import ConfigError, JobConfig, config_reference_markdown, load_config, parse_args, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_committed_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def test_overrides_of_each_type():
    cfg = parse_args(["--config", str(REPO / "train_configs/debug_model.toml"), "--training.steps=7",
                      "--optimizer.lr_attention", "1e-8", "--training.document_masking=true",
                      "--eval.val_t_grid=[0.25, 0.75]", "--data.datasets=a,b", "--data.weights=0.3,0.7",
                      "--training.global_batch_tokens=2_097_152", "--objective.name=mdlm"])
    assert cfg.training.steps == 7 and cfg.optimizer.lr_attention == 1e-8
    assert cfg.training.document_masking is True and cfg.eval.val_t_grid == [0.25, 0.75]
    assert cfg.data.datasets == ["a", "b"] and cfg.data.weights == [0.3, 0.7]
    assert cfg.training.global_batch_tokens == 2_097_152 and cfg.objective.name == "mdlm"


def test_include_merges_and_cycles_fail(tmp_path):
    (tmp_path / "base.toml").write_text('[training]\nsteps = 11\nseq_len = 128\n[objective]\nname = "mdlm"\n')
    (tmp_path / "child.toml").write_text('include = "base.toml"\n[training]\nsteps = 22\n')
    cfg = load_config(tmp_path / "child.toml")
    assert (cfg.training.steps, cfg.training.seq_len, cfg.objective.name) == (22, 128, "mdlm")
    (tmp_path / "a.toml").write_text('include = "b.toml"\n')
    (tmp_path / "b.toml").write_text('include = "a.toml"\n')
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('include = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize("args,message", [
    (["--training.stepz=3"], "unknown key training.stepz; did you mean 'steps'?"),
    (["--trainig.steps=3"], "unknown section [trainig]; did you mean 'training'?"),
    (["--training.steps=ten"], "training.steps (from --training.steps): expected int, got 'ten'"),
    (["--objective.name=diffusion"], "'diffusion' is not an objective; expected one of 'a2d', 'mdlm', 'ar'"),
    (["--objective.eps=1.5"], "objective.eps (from --objective.eps): 1.5 must be in (0, 1)"),
    (["--training.seq_len=0"], "must be > 0"),
    (["--training.document_masking=maybe"], "expected true or false"),
    (["steps=3"], "overrides look like --section.key=value"),
])
def test_cli_errors(args, message):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert message in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("[training]\nlocal_batch = 4\n")
    with pytest.raises(ConfigError, match=r"x.toml: unknown key training.local_batch; did you mean 'local_batch_size'"):
        load_config(f)
    f.write_text('[training]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"training.steps \(.*x.toml\): expected int, got 'many'"):
        load_config(f)
    f.write_text("[training\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(f)


def test_cross_field_validation():
    cfg = load_config(None, ["--objective.name=ar"])
    with pytest.raises(ConfigError, match="needs objective.attention_recipe='causal'"):
        validate(cfg)
    cfg = load_config(None, ["--parallelism.tensor_parallel_degree=2"])
    with pytest.raises(ConfigError, match="tensor parallelism is not implemented"):
        validate(cfg)
    cfg = load_config(None, ["--parallelism.expert_parallel_degree=3"])
    with pytest.raises(ConfigError, match="must divide the FSDP degree 4"):
        validate(cfg, world_size=4)
    cfg = load_config(None, ["--training.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="not a multiple"):
        validate(cfg)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "train_configs/qwen3_30b_a3b_rnd1.toml", ["--training.steps=5"])
    f = tmp_path / "resolved.toml"
    f.write_text(cfg.to_toml())
    assert load_config(f).to_dict() == cfg.to_dict()


def test_config_reference_is_current():
    assert (REPO / "docs" / "config.md").read_text() == config_reference_markdown() + "\n"


@pytest.mark.parametrize("args,message", [
    (["--objective.block_size=8"], "only for block_a2d / block_mdlm"),
    (["--objective.name=block_a2d"], "needs a block size"),
    (["--objective.name=block_mdlm", "--objective.block_size=8", "--objective.block_schedule_sizes=[1,8]"],
     "block_schedule_sizes has 2 entries but block_schedule_tokens has 0"),
    (["--objective.name=block_a2d", "--objective.block_size=8", "--objective.block_schedule_sizes=[1,4]",
      "--objective.block_schedule_tokens=[0,100]"], "ends at 4 but objective.block_size=8"),
    (["--objective.name=block_a2d", "--objective.block_size=8", "--objective.block_schedule_sizes=[1,8]",
      "--objective.block_schedule_tokens=[5,100]"], "increasing token counts starting at 0"),
    (["--objective.name=block_a2d", "--objective.block_size=8", "--objective.attention_recipe=grafting",
      "--objective.grafting_tokens=10"], "block-causal from step 0"),
    (["--objective.name=ar", "--objective.attention_recipe=causal", "--objective.complementary_masking=true"],
     "needs a masking objective"),
])
def test_block_and_sft_keys_fail_with_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(parse_args(args))
    assert "\n" not in str(e.value)
