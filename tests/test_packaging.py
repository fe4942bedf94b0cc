"""The project installs beside Hugging Face's ``kernels`` package (issue 25).

transformers 5.25 requires PyPI's ``kernels`` (import name ``kernels``). This project's kernels
were once a top-level package of that name: from the repository root ours shadowed theirs
(``from kernels import CUDAProperties`` failed inside transformers), and a non-editable install
wrote our files into theirs. They now live at ``rnd1.kernels``, and the wheel holds ``rnd1``
alone. These tests fail on the old layout: from the repository root the first import finds our
folder, and the wheel lists a top-level ``kernels/``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(code: str, cwd: Path, python: str = sys.executable, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's `kernels` is not installed "
                    "(transformers >= 5.25 brings it; the test extra installs the newest transformers)")
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_hf_kernels_and_ours_import_in_one_process(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    code = ("import kernels, rnd1.kernels.grouped_gemm, rnd1.kernels.token_dispatch, "
            "rnd1.kernels.masked_cross_entropy, rnd1.kernels.autotune\n"
            "from kernels import CUDAProperties\n"
            "print(kernels.__file__); print(rnd1.kernels.grouped_gemm.__file__)")
    proc = _run(code, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours = proc.stdout.split()
    assert Path(ours).resolve().is_relative_to(REPO / "rnd1" / "kernels")
    assert not Path(theirs).resolve().is_relative_to(REPO), f"`kernels` resolved inside the repository: {theirs}"


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's `kernels` is not installed")
def test_transformers_qwen3_moe_imports_from_repo_root():
    """What every transformers-based test here needs (the HF oracles): before the move this
    failed with ImportError: cannot import name 'CUDAProperties' from 'kernels' (<repo>/kernels)."""
    proc = _run("from transformers import Qwen3MoeForCausalLM, Qwen3MoeConfig\n"
                "m = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, "
                "moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, "
                "head_dim=16, num_experts=4, num_experts_per_tok=2))\nprint(type(m).__name__)", REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "Qwen3MoeForCausalLM", proc.stderr[-3000:]


def test_no_module_imports_a_top_level_kernels_package():
    """Only Hugging Face's package may be imported as ``kernels`` (this file does, on purpose)."""
    offenders = []
    for path in [*REPO.glob("rnd1/**/*.py"), *REPO.glob("scripts/**/*.py"), *REPO.glob("tests/**/*.py")]:
        if path.resolve() == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith(("import kernels", "from kernels")) or "-m kernels." in s:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {s}")
    assert not offenders, "\n".join(offenders)
    assert not (REPO / "kernels").exists(), "a top-level kernels/ folder would shadow Hugging Face's package"


def test_kernels_import_nothing_from_the_rest_of_rnd1():
    """The kernel ops stay a leaf: they know nothing of the model, objectives or trainer (only
    ``bench/gpu_check.py`` runs training steps, so it may import the model)."""
    offenders = []
    for path in (REPO / "rnd1" / "kernels").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith(("from rnd1", "import rnd1")) and not s.startswith(("from rnd1.kernels", "import rnd1.kernels")):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {s}")
    assert not offenders, "\n".join(offenders)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info/ beside the sources it builds
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info",
                                                               "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("rnd1-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_rnd1_alone(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"rnd1"}, sorted(tops)
    with zipfile.ZipFile(wheel) as z:  # the kernels and their benchmarks travel inside rnd1
        names = set(z.namelist())
    assert {"rnd1/kernels/grouped_gemm.py", "rnd1/kernels/bench/gpu_check.py"} <= names


@pytest.mark.slow
def test_wheel_installs_next_to_transformers_and_trains(wheel, tmp_path, byte_dataset):
    """A non-editable install in a fresh venv that sees this environment's torch and transformers
    (``--system-site-packages``; nothing is downloaded): rnd1 comes from the venv, transformers'
    ``kernels`` is untouched, the debug model trains one step, and the HF model class imports."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    assert (Path(site) / "rnd1" / "kernels" / "grouped_gemm.py").is_file()
    assert not (Path(site) / "kernels").exists(), "the wheel wrote a top-level kernels/ into site-packages"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    probe = ("import rnd1, rnd1.kernels.grouped_gemm; print(rnd1.__file__)\n"
             "from transformers import Qwen3MoeForCausalLM\n"
             "import kernels; print(kernels.__file__)")
    proc = _run(probe, workdir, python=py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rnd1_file, kernels_file = proc.stdout.split()
    assert Path(rnd1_file).resolve().is_relative_to(Path(site).resolve()), rnd1_file
    assert not Path(kernels_file).resolve().is_relative_to(Path(site).resolve())
    run = tmp_path / "run"
    proc = subprocess.run([py, "-m", "rnd1.train", "--config", str(REPO / "train_configs" / "debug_model.toml"),
                           f"--job.dump_folder={run}", f"--data.datasets=[\"{byte_dataset}\"]", "--data.prepare=",
                           "--training.steps=1", "--training.local_batch_size=2", "--training.seq_len=64",
                           "--eval.interval=0", "--checkpoint.interval=0", "--metrics.peak_flops=1e11"],
                          cwd=workdir, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.jsonl").read_text().count('"step": 1') == 1


@pytest.mark.slow
def test_offline_editable_install_as_documented(tmp_path):
    """The README's install for a GPU machine without network: ``pip install --no-deps
    --no-build-isolation -e .`` with no index at all (``--no-index``) builds with the setuptools
    the environment already has; then the kernels import from another folder. The venv gets no
    pip or setuptools of its own (``ensurepip``'s setuptools 65 cannot build a wheel without the
    ``wheel`` package), so it builds with this environment's, as the GPU image would with its."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                           "-e", str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = _run("import rnd1.kernels.bench.gpu_check as g, rnd1.kernels.grouped_gemm as k; print(k.__file__)",
                workdir, python=py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve().is_relative_to(REPO)


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's `kernels` is not installed")
def test_the_gpu_check_does_not_put_rnd1_itself_on_the_path(tmp_path):
    """gpu_check puts the repository root on sys.path (so it runs by file path); one level too
    deep and ``rnd1/`` would be there, whose ``kernels/`` shadows Hugging Face's again."""
    proc = _run("import sys, rnd1.kernels.bench.gpu_check\nimport kernels\nfrom kernels import CUDAProperties\n"
                "print(kernels.__file__)", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not Path(proc.stdout.strip()).resolve().is_relative_to(REPO)
