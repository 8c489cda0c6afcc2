import pytest

from model_zoo.config import BUILTIN_CONFIGS
from serving.buckets import BucketLadder
from serving.kv_sizing import plan_kv_cache

LLAMA8B = BUILTIN_CONFIGS["llama-3.1-8b"]


def test_ladder_tops_are_the_engine_limits_and_select_fits():
    b = BucketLadder.build(max_num_batched_tokens=2048, max_num_seqs=256, max_pages_per_seq=512,
                           paged_width_buckets=False)
    assert b.token_buckets[-1] == 2048 and b.seq_buckets[-1] == 256 and b.page_buckets == (512,)
    assert b.select(1, 1, 3) == (16, 8, 512)
    assert b.select(17, 9, 512) == (64, 32, 512)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        b.select(2049, 1, 1)
    user = BucketLadder.build(max_num_batched_tokens=100, max_num_seqs=8, max_pages_per_seq=8,
                              token_buckets=(16, 64, 512), seq_buckets=(4,), paged_width_buckets=False)
    assert user.token_buckets == (16, 64, 100) and user.seq_buckets == (4, 8)


def test_decode_seq_ladder_defaults_to_the_seq_ladder_and_ends_at_its_top():
    b = BucketLadder.build(max_num_batched_tokens=2048, max_num_seqs=256, max_pages_per_seq=8,
                           token_buckets=(512, 2048), seq_buckets=(1, 64, 256))
    assert b.decode_seq_buckets == b.seq_buckets == (1, 64, 256)
    fine = BucketLadder.build(max_num_batched_tokens=2048, max_num_seqs=200, max_pages_per_seq=8,
                              token_buckets=(512, 2048), seq_buckets=(1, 64, 256),
                              decode_seq_buckets=(8, 1, 16, 32, 64, 128, 256, 512))
    assert fine.seq_buckets == (1, 64, 200)
    assert fine.decode_seq_buckets == (1, 8, 16, 32, 64, 128, 200)      # sorted, top = max_num_seqs
    assert [fine.decode_seqs(n) for n in (1, 2, 9, 33, 65, 129, 200)] == [1, 8, 16, 64, 128, 200, 200]
    assert fine.select(9, 9, 8) == (512, 64, 8)          # mixed steps keep the coarse seq ladder
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        fine.decode_seqs(201)
    with pytest.raises(ValueError, match="must end at the largest seq bucket 256"):
        BucketLadder((512,), (1, 256), (8,), (1, 128))


def test_all_shapes_cover_every_selectable_step():
    b = BucketLadder.build(max_num_batched_tokens=256, max_num_seqs=64, max_pages_per_seq=128)
    shapes = set(b.all_shapes())
    for tokens in range(1, 257, 7):
        for seqs in range(1, min(tokens, 64) + 1, 5):
            for pages in (1, 9, 128):
                assert b.select(tokens, seqs, pages) in shapes
    # Never a sequence bucket that no token count can fill.
    assert (16, 64, 8) not in shapes


def test_kv_plan_cpu_bytes_and_caps():
    plan = plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="cpu", gpu_memory_utilization=0.9,
                         num_gpu_blocks_override=None, kv_cache_memory=2 ** 30, max_model_len=None,
                         device_memory=None, max_num_batched_tokens=256, max_num_seqs=8)
    per_page = 2 * 32 * 8 * 128 * 2 * 16
    assert plan.bytes_per_page == per_page and plan.num_pages == 2 ** 30 // per_page
    assert plan.max_model_len == (plan.num_pages - 1) * 16       # capped by the cache
    with pytest.raises(ValueError, match="larger than the KV cache can hold"):
        plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="cpu", gpu_memory_utilization=0.9,
                      num_gpu_blocks_override=None, kv_cache_memory=2 ** 30, max_model_len=100_000,
                      device_memory=None, max_num_batched_tokens=256, max_num_seqs=8)
    with pytest.raises(ValueError, match="model's context length"):
        plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="cpu", gpu_memory_utilization=0.9,
                      num_gpu_blocks_override=None, kv_cache_memory=2 ** 40, max_model_len=200_000,
                      device_memory=None, max_num_batched_tokens=256, max_num_seqs=8)


def test_kv_plan_gpu_uses_utilization_minus_weights_and_override_wins():
    mem = {"bytes_limit": 80 * 2 ** 30, "bytes_in_use": 16 * 2 ** 30}
    plan = plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="gpu", gpu_memory_utilization=0.9,
                         num_gpu_blocks_override=None, kv_cache_memory=None, max_model_len=8192,
                         device_memory=mem, max_num_batched_tokens=2048, max_num_seqs=256)
    assert 50 * 2 ** 30 < plan.total_bytes < 0.9 * 80 * 2 ** 30 - 16 * 2 ** 30
    assert plan.max_concurrency() > 50
    over = plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="gpu", gpu_memory_utilization=0.9,
                         num_gpu_blocks_override=1000, kv_cache_memory=None, max_model_len=None,
                         device_memory=mem, max_num_batched_tokens=2048, max_num_seqs=256)
    assert over.num_pages == 1000 and over.max_model_len == 999 * 16
    with pytest.raises(ValueError, match="Not enough memory"):
        plan_kv_cache(LLAMA8B, page_size=16, dtype_bytes=2, platform="gpu", gpu_memory_utilization=0.2,
                      num_gpu_blocks_override=None, kv_cache_memory=None, max_model_len=None,
                      device_memory=mem, max_num_batched_tokens=2048, max_num_seqs=256)


def test_gpu_default_ladder_is_the_measured_one_and_follows_the_engine_limits():
    from serving.engine_builder import _GPU_DEFAULTS

    def build(tokens, seqs):
        return BucketLadder.build(max_num_batched_tokens=tokens, max_num_seqs=seqs, max_pages_per_seq=128,
                                  token_buckets=_GPU_DEFAULTS["token_buckets"],
                                  seq_buckets=_GPU_DEFAULTS["seq_buckets"],
                                  decode_seq_buckets=_GPU_DEFAULTS["decode_seq_buckets"], paged_width_buckets=False)

    # The defaults' limits give exactly the measured ladder (gpu_sharegpt_configs.sh's C-seqs512).
    ladder = build(_GPU_DEFAULTS["max_num_batched_tokens"], _GPU_DEFAULTS["max_num_seqs"])
    assert (ladder.token_buckets, ladder.seq_buckets) == ((512, 2048), (1, 64, 512))
    assert ladder.decode_seq_buckets == (1, 8, 16, 32, 64, 128, 256, 512)
    # Raised limits become the top rungs; lowered ones drop the rungs above them.
    ladder = build(8192, 1024)
    assert (ladder.token_buckets, ladder.seq_buckets) == ((512, 2048, 8192), (1, 64, 512, 1024))
    ladder = build(256, 32)
    assert (ladder.token_buckets, ladder.seq_buckets, ladder.decode_seq_buckets) == ((256,), (1, 32), (1, 8, 16, 32))
    assert ladder.select(200, 5, 3) == (256, 32, 128)


def test_batch_limits_take_the_users_values_and_else_the_platforms():
    from serving.config import EngineArgs
    from serving.engine_builder import _CPU_DEFAULTS, _GPU_DEFAULTS, batch_limits

    gpu = (_GPU_DEFAULTS["max_num_seqs"], _GPU_DEFAULTS["max_num_batched_tokens"])
    assert batch_limits(EngineArgs(), "gpu") == gpu == (512, 2048)
    assert batch_limits(EngineArgs(), "cpu") == (_CPU_DEFAULTS["max_num_seqs"], _CPU_DEFAULTS["max_num_batched_tokens"])
    # A value the user gives is kept, the old EngineArgs default (256) included.
    assert batch_limits(EngineArgs(max_num_seqs=256), "gpu") == (256, 2048)
    assert batch_limits(EngineArgs(max_num_seqs=256, max_num_batched_tokens=4096), "cpu") == (256, 4096)
    # The OpenAI server's default is at most 256 sequences; a user's value still wins.
    assert batch_limits(EngineArgs(), "gpu", server=True) == (256, 2048)
    assert batch_limits(EngineArgs(), "cpu", server=True) == batch_limits(EngineArgs(), "cpu")
    assert batch_limits(EngineArgs(max_num_seqs=512), "gpu", server=True) == (512, 2048)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineArgs(max_num_seqs=0)


def test_the_server_builds_its_engine_with_the_server_limits(monkeypatch):
    from serving import engine_builder
    from serving.async_llm import AsyncLLM
    from serving.config import EngineArgs

    seen = []

    def fake_build(args, *, server=False):
        seen.append(server)
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine_builder, "build_engine_parts", fake_build)
    with pytest.raises(RuntimeError, match="stop here"):
        AsyncLLM.from_engine_args(EngineArgs())
    assert seen == [True]
