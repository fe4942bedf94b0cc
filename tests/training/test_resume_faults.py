"""What a restart meets in a run folder (issue 29): every checkpoint damaged refuses to retrain from
step 0; a resume that would change the data or noise stream (seq_len, seed) or the stored dtype
is refused, one that changes the batch size is said; a disk that fills between saves is one line
like a full disk during a save; a damaged meta.json is one line; a block size that does not divide
seq_len is said."""

import errno
import os

import pytest

from rnd1 import train as train_mod
from rnd1.config import load_config

from test_checkpoint_faults import CONFIG, _args, _biggest_shard, _flip_floats  # noqa: E402


def _main(monkeypatch, capsys, args):
    monkeypatch.setattr(train_mod, "parse_args", lambda argv: load_config(CONFIG, args))
    code = train_mod.main([])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_every_checkpoint_damaged_refuses_to_retrain_from_step_0(tmp_path, byte_dataset, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _main(monkeypatch, capsys, _args(run, byte_dataset))[0] == 0  # checkpoints at steps 2 and 4
    for step in (2, 4):
        _flip_floats(_biggest_shard(run / "checkpoint" / f"step-{step:08d}"))
    code, out, err = _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 6}))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {run / 'checkpoint'}: no intact checkpoint left (set aside as damaged: "
                             f"step-00000002.damaged, step-00000004.damaged); refusing to train this run again "
                             f"from step 0. To start over on purpose, move {run / 'checkpoint'} away"), err
    assert "step      1" not in out  # nothing trained
    # starting over on purpose: the folder moved away
    os.rename(run / "checkpoint", tmp_path / "old")
    assert _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 2}))[0] == 0


@pytest.mark.parametrize("key,value", [("training.seq_len", 32), ("training.seed", 7), ("model.dtype", "bfloat16")])
def test_a_resume_that_changes_the_stream_or_dtype_is_refused(tmp_path, byte_dataset, monkeypatch, capsys,
                                                              key, value):
    run = tmp_path / "run"
    assert _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 2}))[0] == 0
    code, out, err = _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 4, key: value}))
    assert code == 2 and len(err) == 1, err
    have = {"training.seq_len": 64, "training.seed": 0, "model.dtype": "float32"}[key]
    assert f"checkpoint step-00000002 was trained with {key}={have!r} but this config gives {value!r}" in err[0]


def test_a_resume_that_changes_the_batch_size_says_so(tmp_path, byte_dataset, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 2}))[0] == 0
    code, out, err = _main(monkeypatch, capsys, _args(run, byte_dataset, **{"training.steps": 3,
                                                                           "training.local_batch_size": 4}))
    assert code == 0, err
    assert "resume changes training.local_batch_size: 2 -> 4 (the data continues at the same global sample" in out


def test_disk_full_between_saves_is_one_line(tmp_path, byte_dataset, monkeypatch, capsys):
    """The metrics log hits ENOSPC at step 3 (checkpoints at 2 and 4): the same one line as a
    full disk during a save, exit 2, and the checkpoint of step 2 stays the newest."""
    from rnd1 import metrics

    real_open = open

    class FullAtStep3:
        def __init__(self, f):
            self._f = f
            self.name = f.name

        def write(self, text):
            if '"step": 3' in text:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(text)

        def close(self):
            self._f.close()

    monkeypatch.setattr(metrics, "open", lambda *a, **k: FullAtStep3(real_open(*a, **k)), raising=False)
    run = tmp_path / "run"
    code, out, err = _main(monkeypatch, capsys, _args(run, byte_dataset))
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: no space left on device while writing {run / 'metrics.jsonl'} at step 3; free space, "
                      f"then run the same command: the run resumes from its newest complete checkpoint")
    assert sorted(p.name for p in (run / "checkpoint").iterdir() if p.name.startswith("step-")) == ["step-00000002"]


def test_a_damaged_meta_json_is_one_line(tmp_path, byte_dataset, monkeypatch, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(byte_dataset, data)
    (data / "meta.json").write_bytes(b'{"format": "\xff"}')
    code, out, err = _main(monkeypatch, capsys, _args(tmp_path / "run", data))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {data / 'meta.json'}: not UTF-8 text (byte 12: invalid start byte)")


def test_a_block_size_that_does_not_divide_seq_len_is_said(tmp_path, byte_dataset, monkeypatch, capsys):
    args = _args(tmp_path / "run", byte_dataset, **{"training.steps": 1, "training.seq_len": 60,
                                                     "objective.name": "block_a2d", "objective.block_size": 16,
                                                     "checkpoint.enable": "false"})
    code, out, err = _main(monkeypatch, capsys, args)
    assert code == 0, err
    assert ("objective block size 16 does not divide training.seq_len 60: the last block of each row has 12 "
            "positions (a shorter block: its own t, scored like the others)") in out
