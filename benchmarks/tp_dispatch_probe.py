"""Why does a tensor-parallel decode step cost the host more than a one-GPU step? A probe without the
engine: an MLP stack of the Llama-3.1-8B shape (32 layers, hidden 4096, mlp 14336, bf16) over a
``tp`` mesh, two all-reduces a layer (as attention + MLP), a donated "cache" written every step, a
host (numpy) input every call: the same runtime pattern as the engine's decode step, compiled in
seconds instead of minutes.

Issue #6: on 2 x H200 the engine's batch-1 TP2 step spent 7.65 ms of host time in dispatch against
2.23 ms at TP1 (profiled), and the TP2 GPUs idled 48% of a step. For each configuration this prints

    call ms     host wall time of one asynchronous call, at most --depth steps in flight (the
                engine's 2; session 6's first run had no bound, which filled PjRt's queue so that
                every call waited for a step: call = step there): what the launching thread pays
    call cpu    the same call's thread CPU time (call - cpu = waiting, not work)
    step ms     wall time per step of the chain, after the last result is ready (throughput at
                that depth)
    sync ms     one call + block_until_ready (latency of an isolated step)

Variants inside one process: TP size, collectives on/off (off = each shard's partial sums left
unreduced: wrong numbers, same launches minus the all-reduces), donation on/off, host vs device
input. Variants across processes (``--flags``: one XLA_FLAGS string per child process, ``|``
separated): command buffers off, the one-shot all-reduce kernel, collectives inside command buffers.

    python benchmarks/tp_dispatch_probe.py --tp 1,2                       # on the GPU machine
    python benchmarks/tp_dispatch_probe.py --flags "|--xla_gpu_enable_command_buffer="
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python benchmarks/tp_dispatch_probe.py --tp 1,2 --layers 2 --hidden 256 --mlp 512 --steps 5  # CPU smoke

``--envs``: '|'-separated environment assignments (``NCCL_PROTO=LL NCCL_ALGO=Ring``), one child
process each, crossed with ``--flags``: NCCL's protocol and algorithm for the small all-reduces of a
batch-1 step. Each child prints its rows when it ends (and rewrites --json), so a run cut short keeps
what it measured. On 4 x H200 with the 70B shape below a child takes about 40 s (weights, compiles,
the timed steps): the ten variants there ran past a 420 s limit (2026-11-22), so split them over
calls. The table's "AR us" is the cost of one all-reduce inside the step: (step ms with the
all-reduces - step ms without) / (2 x layers), per process. On 4 x H200 the 70B TP4 engine step
spends 2.56 ms in 163 all-reduces of 16 KiB (15.7 us each; XLA's one-shot kernel: 24.5 us), the
largest cost beside the weight-streaming GEMMs (results/2026-11-22-h200-decode-profile-70b-tp4-*.json):

    python benchmarks/tp_dispatch_probe.py --tp 4 --layers 80 --hidden 8192 --mlp 7168 --steps 100 \
        --envs "|NCCL_PROTO=LL|NCCL_PROTO=LL128|NCCL_ALGO=Tree|NCCL_ALGO=Ring NCCL_PROTO=LL" \
        --flags "|--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" --json $OUT/ar.json

NVLink multicast stays off (the GPU machines' rule): a variant that sets NCCL_NVLS_ENABLE to
anything but 0 is refused.

Writes the table as JSON to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def build_step(mesh, *, layers: int, collectives: bool, donate: bool):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    def layer(x, w_up, w_down, cache_l, pos):
        # w_up [D, F/tp] (columns split), w_down [F/tp, D] (rows split): the partial product of each
        # shard needs one all-reduce, as Megatron's MLP (and attention's o_proj) does.
        for _ in range(2):                                  # attention-like + MLP-like half
            h = jax.nn.silu(x @ w_up)
            y = h @ w_down
            if collectives:
                y = jax.lax.psum(y, "tp")
            x = x + y.astype(x.dtype)
        cache_l = jax.lax.dynamic_update_slice(cache_l, h[None, :, :128], (pos, 0, 0))
        return x, cache_l

    def body(w_up, w_down, cache, x, pos):
        new = []
        for i in range(layers):                             # unrolled, as the GPU engine build
            x, c = layer(x, w_up[i], w_down[i], cache[i], pos[0])
            new.append(c)
        return x, jnp.stack(new)

    spec_up, spec_down, spec_cache = P(None, None, "tp"), P(None, "tp", None), P(None, None, None, "tp")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec_up, spec_down, spec_cache, P(), P()),
                       out_specs=(P(), spec_cache), check_vma=False)
    sh = lambda s: NamedSharding(mesh, s)  # noqa: E731
    return jax.jit(fn, donate_argnums=(2,) if donate else (),
                   in_shardings=(sh(spec_up), sh(spec_down), sh(spec_cache), sh(P()), sh(P())),
                   out_shardings=(sh(P()), sh(spec_cache)))


def probe(tp: int, *, layers: int, hidden: int, mlp: int, batch: int, steps: int, collectives: bool,
          donate: bool, host_input: bool, depth: int = 2) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    sh = lambda s: NamedSharding(mesh, s)  # noqa: E731
    w_up = jax.device_put(jax.random.normal(k1, (layers, hidden, mlp), jnp.bfloat16) * 0.02, sh(P(None, None, "tp")))
    w_down = jax.device_put(jax.random.normal(k2, (layers, mlp, hidden), jnp.bfloat16) * 0.02, sh(P(None, "tp", None)))
    cache = jax.device_put(jnp.zeros((layers, 64, batch, 128 * tp), jnp.bfloat16), sh(P(None, None, None, "tp")))
    x = jax.device_put(jnp.ones((batch, hidden), jnp.bfloat16), sh(P()))
    step = build_step(mesh, layers=layers, collectives=collectives, donate=donate)

    def pos_arg(i):
        p = np.array([i % 64], np.int32)
        return p if host_input else jax.device_put(p, sh(P()))

    # warm: compile + fill the C++ dispatch caches
    for i in range(3):
        x, cache = step(w_up, w_down, cache, x, pos_arg(i))
    jax.block_until_ready((x, cache))

    pos_args = [pos_arg(i) for i in range(steps)]
    call_wall, call_cpu, outs = [], [], []
    t0 = time.perf_counter()
    for i in range(steps):
        if i >= depth:
            # At most ``depth`` steps in flight, as the engine keeps (async scheduling: 2); an
            # unbounded chain fills PjRt's queue and every call then waits for a step to finish.
            outs[i - depth].block_until_ready()
        w, c = time.perf_counter(), time.thread_time()
        x, cache = step(w_up, w_down, cache, x, pos_args[i])
        call_cpu.append(time.thread_time() - c)
        call_wall.append(time.perf_counter() - w)
        outs.append(x)
    jax.block_until_ready((x, cache))
    step_ms = (time.perf_counter() - t0) / steps * 1e3

    sync = []
    for i in range(max(5, steps // 4)):
        w = time.perf_counter()
        x, cache = step(w_up, w_down, cache, x, pos_args[i % steps])
        jax.block_until_ready((x, cache))
        sync.append(time.perf_counter() - w)
    med = lambda v: round(float(np.median(v)) * 1e3, 4)  # noqa: E731
    return dict(tp=tp, collectives=collectives, donate=donate, host_input=host_input,
                call_ms=med(call_wall), call_cpu_ms=med(call_cpu), step_ms=round(step_ms, 4), sync_ms=med(sync))


def run_variants(args) -> list[dict]:
    import jax

    rows = []
    tps = [t for t in (int(s) for s in args.tp.split(",")) if t <= len(jax.devices())]
    for tp in tps:
        combos = [(True, True, True)]
        if tp > 1:
            combos.append((False, True, True))         # no all-reduces
        combos += [(tp > 1, False, True), (tp > 1, True, False)]   # no donation; device input
        for collectives, donate, host_input in combos:
            r = probe(tp, layers=args.layers, hidden=args.hidden, mlp=args.mlp, batch=args.batch, steps=args.steps,
                      collectives=collectives, donate=donate, host_input=host_input, depth=args.depth)
            r["xla_flags"] = os.environ.get("XLA_FLAGS", "")
            r["env"] = os.environ.get(_VARIANT_ENV, "")
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


# The child's variant environment, recorded in its rows (set by the parent for --envs).
_VARIANT_ENV = "TP_PROBE_VARIANT_ENV"


def add_allreduce_us(rows: list[dict], layers: int) -> None:
    """Each row gets ``allreduce_us``: per (process variant, tp), the donated host-input step with
    all-reduces minus the one without, over the step's 2 x layers all-reduces (None at TP1)."""
    base = {(r["env"], r["xla_flags"], r["tp"]): r["step_ms"] for r in rows
            if not r["collectives"] and r["donate"] and r["host_input"] and r["tp"] > 1}
    for r in rows:
        off = base.get((r["env"], r["xla_flags"], r["tp"]))
        on = r["collectives"] and r["donate"] and r["host_input"]
        r["allreduce_us"] = round((r["step_ms"] - off) * 1e3 / (2 * layers), 2) if on and off is not None else None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'env':<28} {'XLA_FLAGS':<40} {'tp':>2} {'coll':>4} {'don':>3} {'host':>4} "
          f"{'call ms':>8} {'call cpu':>8} {'step ms':>8} {'sync ms':>8} {'AR us':>7}")
    for r in rows:
        ar = r.get("allreduce_us")
        print(f"{r.get('env', '')[:28]:<28} {r['xla_flags'][:40]:<40} {r['tp']:>2} "
              f"{'y' if r['collectives'] else 'n':>4} "
              f"{'y' if r['donate'] else 'n':>3} {'y' if r['host_input'] else 'n':>4} {r['call_ms']:>8.3f} "
              f"{r['call_cpu_ms']:>8.3f} {r['step_ms']:>8.3f} {r['sync_ms']:>8.3f} "
              f"{'-' if ar is None else format(ar, '.2f'):>7}")


def parse_env(assignments: str) -> dict:
    """'A=1 B=x' -> {"A": "1", "B": "x"}; NVLink multicast may not be switched on."""
    env = {}
    for item in assignments.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--envs: expected NAME=VALUE, got {item!r}")
        env[key] = value
    if env.get("NCCL_NVLS_ENABLE", "0") != "0":
        raise SystemExit("--envs: NCCL_NVLS_ENABLE must stay 0 (NVLink multicast is off on these machines)")
    return env


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default="1,2")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=14336)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=2, help="most steps in flight (the engine's async scheduling: 2)")
    p.add_argument("--flags", default=None,
                   help="'|'-separated XLA_FLAGS strings, one child process each (default: this process only)")
    p.add_argument("--envs", default=None,
                   help="'|'-separated environment assignments ('NCCL_PROTO=LL NCCL_ALGO=Ring'), one child "
                        "process each, crossed with --flags")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if (args.flags is None and args.envs is None) or args.child:
        rows = run_variants(args)
        if args.child:
            print("ROWS " + json.dumps(rows), flush=True)
            return rows
        add_allreduce_us(rows, args.layers)
    else:
        rows = []
        child_argv = list(argv if argv is not None else sys.argv[1:])
        for opt in ("--flags", "--envs"):
            if opt in child_argv:
                i = child_argv.index(opt)
                del child_argv[i:i + 2]
        flag_list = [os.environ.get("XLA_FLAGS", "")] if args.flags is None else args.flags.split("|")
        env_list = [""] if args.envs is None else args.envs.split("|")
        for assignments in env_list:
            extra = parse_env(assignments)
            for flags in flag_list:
                env = dict(os.environ, **extra, XLA_FLAGS=flags.strip())
                env[_VARIANT_ENV] = assignments.strip()
                print(f"#### env='{assignments.strip()}' XLA_FLAGS='{flags.strip()}'", flush=True)
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, *child_argv, "--child"], env=env,
                                      capture_output=True, text=True)
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
                if proc.returncode or not found:
                    print(f"child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                    continue
                # Each child's rows as soon as it ends (and in --json): a run cut short by a time
                # limit keeps the variants done so far.
                new = json.loads(found[-1][5:])
                add_allreduce_us(new, args.layers)
                print_table(new)
                print(f"({time.perf_counter() - start:.0f} s)", flush=True)
                rows += new
                write_json(args.json, rows)
    print_table(rows)
    write_json(args.json, rows)
    return rows


def write_json(path, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
