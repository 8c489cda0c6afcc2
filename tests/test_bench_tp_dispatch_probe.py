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



def test_allreduce_cost_is_the_step_difference_over_the_all_reduces():
    mod = _probe_module()
    row = lambda env, tp, coll, step, donate=True, host=True: dict(  # noqa: E731
        env=env, xla_flags="", tp=tp, collectives=coll, donate=donate, host_input=host, step_ms=step)
    rows = [row("", 4, True, 13.0), row("", 4, False, 10.5), row("", 4, True, 14.0, donate=False),
            row("NCCL_PROTO=LL", 4, True, 12.0), row("NCCL_PROTO=LL", 4, False, 10.4), row("", 1, True, 9.0)]
    mod.add_allreduce_us(rows, layers=80)
    assert rows[0]["allreduce_us"] == 15.62          # 2.5 ms over 160 all-reduces
    assert rows[3]["allreduce_us"] == 10.0           # its own process's control, not the other's
    assert [r["allreduce_us"] for r in (rows[1], rows[2], rows[4], rows[5])] == [None] * 4


def test_env_variants_run_in_children_and_nvlink_multicast_stays_off(tmp_path, capsys):
    import pytest

    mod = _probe_module()
    assert mod.parse_env("NCCL_PROTO=LL NCCL_ALGO=Ring") == {"NCCL_PROTO": "LL", "NCCL_ALGO": "Ring"}
    assert mod.parse_env("NCCL_NVLS_ENABLE=0") == {"NCCL_NVLS_ENABLE": "0"}
    for bad in ("NCCL_NVLS_ENABLE=1", "NCCL_PROTO"):
        with pytest.raises(SystemExit):
            mod.parse_env(bad)
    rows = mod.main(["--tp", "1", "--layers", "1", "--hidden", "32", "--mlp", "64", "--steps", "4",
                     "--envs", "|TP_PROBE_TEST=1"])
    assert [r["env"] for r in rows if r["collectives"] and r["donate"] and r["host_input"]] == ["", "TP_PROBE_TEST=1"]
    assert all(r["step_ms"] > 0 for r in rows)
