"""Every config key is read by the code it configures.

A key that parses but that no code reads is a setting that silently does nothing (issue 13: the
old ``kernels.dispatch``, ``metrics.save_jsonl``, ``compile.components``, ``optimizer.name``).
The check walks the AST of every module under rnd1/ (the config module's own definitions and
cross-field checks do not count) for ``<...>.<section>.<key>``, or ``<alias>.<key>`` where the
alias is a local name bound to ``<...>.<section>`` by an assignment or by a call that passes
``<...>.<section>`` to the function as an argument. Matching the section, not just the key name,
matters: ``name``, ``eps``, ``enable`` and ``device`` are attributes of many other objects.
"""

import ast
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import pytest

from rnd1.config import SECTIONS, ConfigError, load_config
from rnd1.metrics import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in (REPO / "rnd1").rglob("*.py") if p != REPO / "rnd1" / "config.py")

#: Keys for people, not code: each must say why it is allowed to be read by nothing.
DESCRIPTIVE = {
    ("job", "description"): "free text kept in the run folder's config.toml so the folder says what the run was",
}


def _section_of(node: ast.AST, sections) -> str | None:
    """'training' for ``<anything>.training``."""
    return node.attr if isinstance(node, ast.Attribute) and node.attr in sections else None


def _callee(call: ast.Call, renamed: dict[str, str]) -> str | None:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return renamed.get(name, name)


def config_reads(trees: list[ast.Module], sections) -> set[tuple[str, str]]:
    """(section, key) pairs read somewhere in ``trees``."""
    # A section handed to a function: (function name, parameter index or keyword) -> sections.
    passed = defaultdict(set)
    for tree in trees:
        renamed = {a.asname: a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   for a in n.names if a.asname}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = _callee(call, renamed)
            for i, arg in enumerate(call.args):
                if s := _section_of(arg, sections):
                    passed[(name, i)].add(s)
            for kw in call.keywords:
                if s := _section_of(kw.value, sections):
                    passed[(name, kw.arg)].add(s)

    reads = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (s := _section_of(node.value, sections)):
                reads.add((s, node.attr))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            alias = defaultdict(set)
            params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
            if params and params[0] in ("self", "cls"):
                params = params[1:]
            for i, p in enumerate(params):
                alias[p] |= passed[(fn.name, i)] | passed[(fn.name, p)]
            for p in fn.args.kwonlyargs:
                alias[p.arg] |= passed[(fn.name, p.arg)]
            for n in ast.walk(fn):
                if isinstance(n, ast.Assign):
                    t, v = n.targets[0], n.value
                    pairs = zip(t.elts, v.elts) if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) else [(t, v)]
                    for target, value in pairs:
                        if isinstance(target, ast.Name) and (s := _section_of(value, sections)):
                            alias[target.id].add(s)
            for n in ast.walk(fn):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                    reads |= {(s, n.attr) for s in alias.get(n.value.id, ())}
    return reads


def unread_keys(trees: list[ast.Module], sections) -> list[str]:
    reads = config_reads(trees, sections)
    return [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)
            if (s, f.name) not in reads and (s, f.name) not in DESCRIPTIVE]


@pytest.fixture(scope="module")
def trees():
    return [ast.parse(p.read_text(), str(p)) for p in SOURCES]


def test_every_config_key_is_read(trees):
    unread = unread_keys(trees, SECTIONS)
    assert not unread, (f"config keys that no code under rnd1/ reads (make them work, or remove them from "
                        f"rnd1/config.py, train_configs/ and the docs): {', '.join(unread)}")


def test_descriptive_allowlist_is_exact(trees):
    """An allowlisted key must exist and really be unread, or the allowlist hides nothing but rot."""
    fields = {(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(DESCRIPTIVE) <= fields, set(DESCRIPTIVE) - fields
    assert not set(DESCRIPTIVE) & config_reads(trees, SECTIONS)


def test_the_check_sees_reads_and_misses():
    """The detector itself: a chained read, an assigned alias and a parameter alias count; a key
    whose name is only an attribute of something else does not."""
    src = '''
def run(cfg):
    print(cfg.training.seq_len)
    o, t = cfg.optimizer, cfg.training
    print(o.eps, helper(cfg.objective))

def helper(obj):
    return obj.name

def other(model):
    return model.steps, model.name
'''
    T = dataclasses.make_dataclass("T", [("seq_len", int), ("steps", int)])
    O = dataclasses.make_dataclass("O", [("eps", float), ("name", str)])
    J = dataclasses.make_dataclass("J", [("name", str)])
    sections = {"training": T, "optimizer": O, "objective": J}
    assert unread_keys([ast.parse(src)], sections) == ["training.steps", "optimizer.name"]


@pytest.mark.parametrize("override", ["--optimizer.name=AdamW", "--checkpoint.async_mode=disabled",
                                      "--compile.components=model"])  # kernels.dispatch is back (issue 15), read
def test_removed_keys_are_unknown(override):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, [override])


@pytest.mark.parametrize("save_jsonl", [True, False])
def test_metrics_save_jsonl(tmp_path, save_jsonl, capsys):
    log = MetricsLogger(tmp_path, save_jsonl=save_jsonl)
    log.log(3, {"loss": 1.5})
    log.close()
    assert "loss 1.5000" in capsys.readouterr().out  # the console line is written either way
    path = tmp_path / "metrics.jsonl"
    if save_jsonl:
        assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 3, "loss": 1.5}]
    else:
        assert not path.exists()
