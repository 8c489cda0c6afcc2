"""benchmarks/tp_dispatch_probe.py runs on CPU (one device here: TP1 rows only) and returns rows whose
times are positive, at the engine's depth of steps in flight."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("tp_dispatch_probe", ROOT / "benchmarks" / "tp_dispatch_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_rows_on_cpu(tmp_path):
    mod = _probe_module()
    out = tmp_path / "rows.json"
    rows = mod.main(["--tp", "1,2", "--layers", "2", "--hidden", "64", "--mlp", "128", "--steps", "6",
                     "--json", str(out)])
    import jax
    assert {r["tp"] for r in rows} == {t for t in (1, 2) if t <= jax.device_count()}
    assert len(rows) >= 3
    for r in rows:
        for key in ("call_ms", "call_cpu_ms", "step_ms", "sync_ms"):
            assert r[key] > 0, (key, r)
    assert out.exists()

