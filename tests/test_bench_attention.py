"""scripts/bench_attention.py runs and reports what it says it reports (a small shape): the
BlockMask's bytes are a fraction of the dense mask's, and flex's backward column says why it is
empty on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_attention_small(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_attention.py"), "--lengths", "384",
                           "--kinds", "two_stream", "documents", "--doc-len", "128", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["kind"], r["method"]): r for r in rows}
    assert set(by) == {("two_stream", "sdpa"), ("two_stream", "flex"), ("documents", "sdpa"), ("documents", "flex")}
    two = by[("two_stream", "flex")]
    assert two["queries"] == 768 and by[("two_stream", "sdpa")]["mask_bytes"] == 768 * 768
    assert two["mask_bytes"] * 20 < 768 * 768  # tile tables, not one byte per (query, key)
    assert 0.3 < two["empty_tiles"] < 0.9  # 6 x 6 tiles of the [x_t | x0] table: most off-diagonal ones empty
    assert by[("documents", "flex")]["empty_tiles"] > 0.1  # documents of ~128 in 3 x 3 tiles: some tiles empty
    assert two["fwd_bwd_s"] is None and by[("two_stream", "sdpa")]["fwd_bwd_s"] > 0
    assert proc.stdout.startswith("# bench_attention on ") and "n/a (no CPU backward)" in proc.stdout
