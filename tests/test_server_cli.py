"""`jaxllm serve` flag parsing: defaults, YAML precedence, one-line errors, --help."""

import pytest

from serving.cli import main, parse_serve_args, UsageError
from serving.config import EngineArgs
from serving.server.args import ServerArgs


def test_defaults_match_the_dataclasses():
    engine, server = parse_serve_args([])
    assert engine == EngineArgs()
    assert server == ServerArgs()


def test_flags_map_to_engine_and_server_args(monkeypatch):
    monkeypatch.delenv("JAXLLM_API_KEY", raising=False)
    engine, server = parse_serve_args([
        "some/model", "--max-model-len", "4k", "-tp", "2", "--pipeline-parallel-size", "1",
        "--no-enable-prefix-caching", "--kv-cache-memory", "64MiB", "--token-buckets", "16,64",
        "--served-model-name", "a", "b", "--port", "9000", "--allowed-origins", '["http://x"]',
        "--api-key", "k", "--max-request-body-bytes", "1MiB", "--scheduling-policy", "priority"])
    assert engine.model == "some/model" and engine.max_model_len == 4096 and engine.tensor_parallel_size == 2
    assert engine.enable_prefix_caching is False and engine.kv_cache_memory == 64 * 2**20
    assert engine.token_buckets == (16, 64) and engine.served_model_name == "a"
    assert engine.scheduling_policy == "priority"
    assert server.port == 9000 and server.allowed_origins == ("http://x",) and server.api_key == "k"
    assert server.served_model_names == ("a", "b") and server.max_request_body_bytes == 2**20


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("JAXLLM_API_KEY", "from-env")
    assert parse_serve_args([])[1].api_key == "from-env"
    assert parse_serve_args(["--api-key", "flag"])[1].api_key == "flag"


def test_yaml_config_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_model_len: 512\nport: 7000\nenable-prefix-caching: false\n"
                   "disable-log-stats: true\nserved-model-name: [x, y]\nallowed-origins: [a, b]\n")
    engine, server = parse_serve_args(["--config", str(cfg), "--port", "7001"])
    assert engine.max_model_len == 512 and server.port == 7001        # command line > YAML
    assert engine.enable_prefix_caching is False and server.disable_log_stats is True
    assert server.served_model_names == ("x", "y") and server.allowed_origins == ("a", "b")
    engine, _ = parse_serve_args(["--config", str(cfg), "--enable-prefix-caching"])
    assert engine.enable_prefix_caching is True


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    with pytest.raises(UsageError, match="unknown option 'no_such_flag'"):
        parse_serve_args(["--config", str(bad)])
    with pytest.raises(UsageError, match="cannot read"):
        parse_serve_args(["--config", str(tmp_path / "missing.yaml")])
    bad.write_text("port: not-a-number\n")
    with pytest.raises(UsageError, match="--port"):
        parse_serve_args(["--config", str(bad)])


@pytest.mark.parametrize("argv,fragment", [
    (["serve", "--port", "abc"], "--port"),
    (["serve", "--dtype", "int3"], "--dtype"),
    (["serve", "--max-num-seqs", "0"], "max_num_seqs"),
    (["serve", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["serve", "--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["serve", "--ssl-keyfile", "k.pem"], "ssl_certfile"),
    (["serve", "--no-such-flag"], "unrecognized arguments"),
])
def test_bad_values_are_one_line_and_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxllm serve: error:") and fragment in err
    assert "Traceback" not in err


def test_help_lists_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--block-size", "--gpu-memory-utilization", "--num-gpu-blocks-override",
                 "--dtype", "--seed", "--tensor-parallel-size", "--pipeline-parallel-size", "--enable-prefix-caching",
                 "--no-enable-prefix-caching", "--scheduling-policy", "--chat-template",
                 "--chat-template-content-format", "--generation-config", "--load-format", "--max-logprobs",
                 "--uvicorn-log-level", "--disable-log-requests", "--disable-log-stats", "--allowed-origins",
                 "--allowed-methods", "--allowed-headers", "--root-path", "--enable-request-id-headers",
                 "--ssl-keyfile", "--ssl-certfile", "--disable-fastapi-docs", "--attention-backend", "--config",
                 "--token-buckets", "--seq-buckets", "--kv-cache-memory", "--compilation-cache-dir",
                 "--sharding-rules", "--download-dir", "--revision", "--tokenizer", "-tp", "-pp"):
        assert flag in out, flag
    assert "(default: 8000)" in out and "(default: 0.9)" in out


def test_chat_template_flag_reads_a_file(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert parse_serve_args(["--chat-template", str(f)])[1].chat_template == f.read_text()
    assert parse_serve_args(["--chat-template", "{{ messages }}"])[1].chat_template == "{{ messages }}"
