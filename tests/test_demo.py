"""The demo's stage reuse (rnd1.demo._stage): reuse only a finished stage of the same settings,
resume an interrupted one, refuse a folder holding anything else (an older demo's run)."""

import pytest

from rnd1 import demo


@pytest.fixture
def trained(monkeypatch):
    calls = []

    def fake_train(config, run, data, steps, *extra):
        calls.append((config, steps, extra))
        (run / "checkpoint").mkdir(exist_ok=True)

    monkeypatch.setattr(demo, "_train", fake_train)
    return calls


def test_finished_stage_is_reused_and_interrupted_one_resumed(tmp_path, trained):
    run = tmp_path / "demo_scp"
    demo._stage("debug_model.toml", run, tmp_path, 100, "--optimizer.lr_attention=2e-3", after="AR 450")
    demo._stage("debug_model.toml", run, tmp_path, 100, "--optimizer.lr_attention=2e-3", after="AR 450")
    assert len(trained) == 1
    record = run / "demo.json"
    record.write_text(record.read_text().replace('"finished": true', '"finished": false'))  # interrupted
    demo._stage("debug_model.toml", run, tmp_path, 100, "--optimizer.lr_attention=2e-3", after="AR 450")
    assert len(trained) == 2


@pytest.mark.parametrize("change", [dict(steps=300), dict(extra=("--optimizer.lr_attention=1e-3",)),
                                    dict(after="AR 400"), dict(no_record=True)])
def test_a_folder_with_other_settings_is_refused(tmp_path, trained, capsys, change):
    run = tmp_path / "demo_scp"
    demo._stage("debug_model.toml", run, tmp_path, 100, "--optimizer.lr_attention=2e-3", after="AR 450")
    if change.get("no_record"):
        (run / "demo.json").unlink()  # a run from before the record existed
    with pytest.raises(SystemExit) as e:
        demo._stage("debug_model.toml", run, tmp_path, change.get("steps", 100),
                    *change.get("extra", ("--optimizer.lr_attention=2e-3",)), after=change.get("after", "AR 450"))
    assert e.value.code == 2 and len(trained) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run} holds a run with other settings than this demo's (an older demo, or another "
                   f"job): remove it, or give --out another folder")
