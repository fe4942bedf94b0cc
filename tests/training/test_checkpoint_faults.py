"""Checkpoint integrity (issue 16): a full disk during a save, and a damaged newest checkpoint
(truncated or overwritten shard, silently changed floats, truncated .metadata / extra_rank0.pt,
junk COMPLETE marker). Each fault gives one line naming the file; nothing already saved is lost."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnd1.checkpoint.dcp import CHECKSUMS, CheckpointError, CheckpointManager
from rnd1.config import load_config
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.parallel.env import DistEnv
from rnd1.train import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _args(run_dir, data, **extra):
    kv = {"job.dump_folder": run_dir, "data.datasets": data, "data.prepare": "", "training.steps": 4,
          "training.local_batch_size": 2, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.interval": 2, "eval.interval": 0, "metrics.peak_flops": 1e12,
          "checkpoint.keep_latest_k": 3}
    kv.update(extra)
    return [f"--{k}={v}" for k, v in kv.items()]


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def _biggest_shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_floats(f: Path, n=1024):
    """Change n float32 values in the middle of the file: same size, loads without complaint."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    vals = torch.frombuffer(data[mid:mid + 4 * n], dtype=torch.float32).clone() + 1.0
    data[mid:mid + 4 * n] = vals.numpy().tobytes()
    f.write_bytes(bytes(data))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _overwrite(f: Path):
    f.write_bytes(os.urandom(f.stat().st_size + 100))


DAMAGE = {
    "truncated_shard": (lambda p: _truncate(_biggest_shard(p)), r"\.distcp: \d+ bytes, \d+ written"),
    "overwritten_shard": (lambda p: _overwrite(_biggest_shard(p)), r"\.distcp: \d+ bytes, \d+ written"),
    "1024_floats_changed": (lambda p: _flip_floats(_biggest_shard(p)), r"\.distcp: checksum mismatch"),
    "truncated_metadata": (lambda p: _truncate(p / ".metadata"), r"/\.metadata: \d+ bytes"),
    "truncated_extra": (lambda p: _truncate(p / "extra_rank0.pt"), r"/extra_rank0\.pt: \d+ bytes"),
    "junk_complete": (lambda p: (p / "COMPLETE").write_bytes(b"\x00\xffjunk{"), r"/COMPLETE: unreadable marker"),
    "junk_checksums": (lambda p: (p / CHECKSUMS).write_text("{not json"), r"/CHECKSUMS: unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_resume_falls_back(tmp_path, damage):
    model = build_model(get_preset("debug"), seed=0)
    cm = CheckpointManager(tmp_path, keep_latest_k=2)
    cm.save(1, model, None, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    cm.save(2, model, None, {"step": 2})
    assert cm.verify(tmp_path / "step-00000002") is None
    hurt, pattern = DAMAGE[damage]
    hurt(tmp_path / "step-00000002")
    lines = []
    step, path = cm.latest_intact(log=lines.append)
    assert step == 1 and path.name == "step-00000001"
    assert len(lines) == 1 and "step-00000002.damaged" in lines[0], lines
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert (tmp_path / "step-00000002.damaged").is_dir()  # set aside, not deleted
    fresh = build_model(get_preset("debug"), seed=1)
    assert cm.load(path, fresh, None) == {"step": 1}
    reference = build_model(get_preset("debug"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values()))
    # later saves and keep-k pruning ignore the set-aside folder
    cm.save(3, model, None, {})
    cm.save(4, model, None, {})
    assert [s for s, _ in cm.complete_checkpoints()] == [3, 4]
    assert (tmp_path / "step-00000002.damaged").is_dir()
    assert cm.latest_intact(log=lines.append)[0] == 4 and len(lines) == 1


def test_checksums_cover_every_file(tmp_path):
    model = build_model(get_preset("debug"), seed=0)
    path = CheckpointManager(tmp_path).save(1, model, None, {})
    sums = json.loads((path / CHECKSUMS).read_text())
    on_disk = {p.name for p in path.iterdir()} - {CHECKSUMS, "COMPLETE"}
    assert set(sums) == on_disk and ".metadata" in sums and "extra_rank0.pt" in sums


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints written before CHECKSUMS existed are accepted (marker and .metadata checked)."""
    model = build_model(get_preset("debug"), seed=0)
    cm = CheckpointManager(tmp_path)
    path = cm.save(1, model, None, {})
    (path / CHECKSUMS).unlink()
    assert cm.latest_intact(log=pytest.fail) == (1, path)


def _fill_disk_on_second_write(monkeypatch):
    """A fake full disk: torch.save writes part of the file, then the device is full."""
    import rnd1.checkpoint.dcp as dcp_mod

    real = torch.save

    def full(obj, f, *a, **k):  # DCP's shards (a stream) and extra_rank0.pt (a path) alike
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"\0" * 4096)
        else:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(dcp_mod.torch, "save", full)
    return lambda: monkeypatch.setattr(dcp_mod.torch, "save", real)


def test_disk_full_during_save_fake(tmp_path, monkeypatch):
    model = build_model(get_preset("debug"), seed=0)
    cm = CheckpointManager(tmp_path, keep_latest_k=1)
    first = cm.save(1, model, None, {"step": 1})
    restore = _fill_disk_on_second_write(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^no space left on device while saving step 2 to .* "
                                              r"\(needs ~\d+ MB, \d+ MB free\)"):
        cm.save(2, model, None, {"step": 2})
    restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # temp folder removed
    assert cm.latest_intact(log=pytest.fail) == (1, first)
    assert cm.load(first, build_model(get_preset("debug"), seed=3), None) == {"step": 1}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real full disk: a tmpfs that holds one model-only debug checkpoint but not two."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs (the fake ENOSPC test covers the logic)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_during_save_real_tmpfs(small_tmpfs):
    model = build_model(get_preset("debug"), seed=0)
    cm = CheckpointManager(small_tmpfs / "ckpt", keep_latest_k=2)
    first = cm.save(1, model, None, {"step": 1})
    assert first.stat() and shutil.disk_usage(small_tmpfs).free < 2 * sum(
        f.stat().st_size for f in first.iterdir())  # the second save cannot fit
    with pytest.raises(CheckpointError, match=r"^no space left on device while saving step 2 to .*ckpt "
                                              r"\(needs ~\d+ MB, \d+ MB free\)"):
        cm.save(2, model, None, {"step": 2})
    assert sorted(p.name for p in cm.folder.iterdir()) == ["latest", "step-00000001"]
    assert cm.verify(first) is None
    assert cm.load(first, build_model(get_preset("debug"), seed=3), None) == {"step": 1}


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_trainer_resumes_from_newest_intact_checkpoint_bit_exact(tmp_path, byte_dataset, capsys):
    """Floats silently changed in the newest checkpoint: detected, set aside, the run resumes
    from the one before and ends exactly where an uninterrupted run ends."""
    ref = Trainer(load_config(CONFIG, _args(tmp_path / "ref", byte_dataset, **{"checkpoint.enable": "false"})), _env())
    ref.train()
    run = tmp_path / "run"
    Trainer(load_config(CONFIG, _args(run, byte_dataset)), _env()).train()
    _flip_floats(_biggest_shard(run / "checkpoint" / "step-00000004"))
    capsys.readouterr()
    cfg = load_config(CONFIG, _args(run, byte_dataset, **{"training.steps": 4}))
    again = Trainer(cfg, _env())
    out = capsys.readouterr().out
    assert "damaged checkpoint set aside as step-00000004.damaged" in out and "checksum mismatch" in out
    assert again.step == 2 and "resumed from" in out and "step-00000002 at step 2" in out
    again.train()
    assert again.step == 4
    ref_w, got = _weights(ref), _weights(again)
    assert all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_trainer_disk_full_stops_with_one_line(tmp_path, byte_dataset, monkeypatch, capsys):
    from rnd1 import train as train_mod

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "parse_args", lambda argv: load_config(CONFIG, _args(run, byte_dataset)))
    calls = {"n": 0}
    real = torch.save

    def full_on_second_save(obj, f, *a, **k):
        if str(f).endswith("extra_rank0.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(f).write_bytes(b"\0" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_on_second_save)
    assert train_mod.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on device while saving step 4 to "), err
    ckpt = run / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000002"]
    assert CheckpointManager(ckpt).verify(ckpt / "step-00000002") is None


def test_read_only_output_folder_is_one_line_at_start_up(tmp_path, byte_dataset):
    """A dump folder on a read-only filesystem fails at start-up with one line naming it (not an
    OSError traceback). Root ignores permission bits, so the test mounts a read-only tmpfs."""
    import subprocess
    import sys
    from pathlib import Path

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        import pytest

        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        repo = Path(__file__).resolve().parents[2]
        proc = subprocess.run([sys.executable, "-m", "rnd1.train", "--config", str(repo / "train_configs" / "debug_model.toml"),
                               f"--job.dump_folder={ro / 'run'}", f"--data.datasets=[\"{byte_dataset}\"]", "--data.prepare=",
                               "--training.steps=1", "--metrics.peak_flops=1e11"], capture_output=True, text=True,
                              timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert f"job.dump_folder={ro / 'run'}: cannot write there" in lines[0] and "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
