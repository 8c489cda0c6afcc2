"""serving.detokenizer: streamed text equals the full decode; stop strings across token boundaries."""

import random

import pytest

from serving.detokenizer import IncrementalDetokenizer
from serving.tokenizer import load_tokenizer
from tests.test_tokenizer import build_sentencepiece_style_tokenizer, find_smollm2_gguf

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Héllo wörld! 你好，世界 🎉🚀 naïve café — ünïcödé 👩‍👩‍👧 end",
    "日本語のテキストと中文文本。한국어 텍스트도 있습니다.",
    "emoji run 🤖🤖🤖🧠🧠 and flags 🇫🇷🇯🇵 then ascii",
    "  leading spaces, tabs\tand\nnewlines\n\n   indented code:\n    def f(x):\n        return x",
    "Ωμέγα, Ünïcode, Ñandú, Čeština, Ελληνικά, עִברִית, العربية",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(find_smollm2_gguf())


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sp_tok(request, tmp_path_factory):
    return load_tokenizer(build_sentencepiece_style_tokenizer(str(tmp_path_factory.mktemp("sp")), request.param))


def stream(tok, ids, prompt=(), chunk=1, finish=True, **kwargs):
    """Feed ids `chunk` at a time; return (deltas, detokenizer)."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas = []
    for i in range(0, len(ids), chunk):
        d = detok.add_tokens(ids[i:i + chunk])
        deltas.append(d.text_delta)
        if detok.finished:
            break
    if finish:
        deltas.append(detok.finish().text_delta)
    return deltas, detok


def test_smollm2_text_streams_exactly_without_replacement_chars(smollm2):
    prompt = smollm2.encode(smollm2.apply_chat_template([{"role": "user", "content": "Say something"}]),
                            add_special_tokens=False)
    for text in TEXTS:
        ids = smollm2.encode(text, add_special_tokens=False)
        for pr in ((), prompt):
            for chunk in (1, 3):
                deltas, detok = stream(smollm2, ids, pr, chunk)
                assert "".join(deltas) == detok.output_text == smollm2.decode(ids) == text
                # A character split across tokens is held until complete, never streamed as U+FFFD.
                assert not any("\ufffd" in d for d in deltas), (text, deltas)
                assert deltas[-1] == ""  # nothing was left to flush


def test_smollm2_random_and_adversarial_ids(smollm2):
    rng = random.Random(0)
    vocab = smollm2.vocab_size
    # Byte-level BPE tokens of single non-ASCII bytes (partial UTF-8 sequences), and special tokens.
    byte_tokens = [i for i in range(17, 300) if smollm2.decode([i]) == "\ufffd"]
    assert len(byte_tokens) > 50
    specials = list(range(17))
    pieces = [smollm2.encode(t, add_special_tokens=False) for t in TEXTS]
    for trial in range(150):
        ids = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.3:
                ids.append(rng.choice(byte_tokens))
            elif r < 0.4:
                ids.append(rng.choice(specials))
            elif r < 0.7:
                p = rng.choice(pieces)
                start = rng.randrange(len(p))
                ids.extend(p[start:start + rng.randint(1, 6)])
            else:
                ids.append(rng.randrange(vocab))
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        skip = trial % 2 == 0
        spaces = trial % 3 != 0
        deltas, detok = stream(smollm2, ids, prompt, chunk=rng.choice([1, 1, 2, 5]),
                               skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        expected = smollm2.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        assert "".join(deltas) == detok.output_text == expected, (ids, prompt, skip, spaces)


def test_special_tokens_flags(smollm2):
    ids = smollm2.encode("<|im_start|>assistant\nHi there<|im_end|><|im_end|> bye", add_special_tokens=False)
    kept, _ = stream(smollm2, ids, skip_special_tokens=False)
    assert "".join(kept) == "<|im_start|>assistant\nHi there<|im_end|><|im_end|> bye"
    skipped, _ = stream(smollm2, ids, skip_special_tokens=True)
    assert "".join(skipped) == "assistant\nHi there bye"


def test_sentencepiece_spacing_and_byte_fallback(sp_tok):
    texts = ["Hello world", "hello  there,   world!", "naïve café 你好 world 🎉 again", "🎉 first", " lead"]
    for text in texts:
        ids = sp_tok.encode(text, add_special_tokens=False)
        # No prompt: exactly decode(output), leading-space rule of the first token included.
        deltas, detok = stream(sp_tok, ids)
        assert "".join(deltas) == sp_tok.decode(ids), (text, deltas)
        assert not any("\ufffd" in d for d in deltas)
        # After a prompt, the output is what it adds to the prompt's text: its leading space stays.
        prompt = sp_tok.encode("Hello there", add_special_tokens=True)
        deltas, detok = stream(sp_tok, ids, prompt)
        full, head = sp_tok.decode(prompt + ids), sp_tok.decode(prompt)
        assert full.startswith(head)
        assert "".join(deltas) == full[len(head):], (text, deltas)
    world = sp_tok.encode("Hello world", add_special_tokens=False)[-1:]
    assert stream(sp_tok, world, sp_tok.encode("Hello"))[0][0] == " world"
    assert "".join(stream(sp_tok, world)[0]) == "world"


def test_sentencepiece_random_ids_and_flags(sp_tok):
    rng = random.Random(1)
    for trial in range(120):
        ids = [rng.randrange(sp_tok.vocab_size) for _ in range(rng.randint(1, 25))]
        skip, spaces = trial % 2 == 0, trial % 3 != 0
        deltas, detok = stream(sp_tok, ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        assert "".join(deltas) == sp_tok.decode(ids, skip_special_tokens=skip,
                                                spaces_between_special_tokens=spaces), (ids, skip, spaces)


def _expected_stop(full, stops, include):
    """Reference: the stop string that completes first in the full text (ties: the longer)."""
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (i, s)
    if best is None:
        return full, None
    i, s = best
    return (full[:i + len(s)] if include else full[:i]), s


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(smollm2, include):
    text = "The answer is 42. END of story. Ünïcödé 你好 STOP here 🎉 done"
    ids = smollm2.encode(text, add_special_tokens=False)
    cases = [
        ["END"], ["42. EN"], ["The"], ["T"], ["你好"], ["好 ST"], ["🎉"], ["ódé 你"], ["story", "answer"],
        ["is 42", "s 4"], ["ST", "STOP here"], ["STOP here", "ST"], ["nope"], ["done"], ["e"], ["\n"],
        ["is 42.", "42. END of"],
    ]
    for stops in cases:
        for chunk in (1, 4):
            deltas, detok = stream(smollm2, ids, chunk=chunk, stop=stops, include_stop_str_in_output=include)
            expected, which = _expected_stop(text, stops, include)
            assert "".join(deltas) == detok.output_text == expected, (stops, chunk, deltas)
            assert detok.stop_string == which
            if which is not None:
                assert detok.finished and deltas[-1] == ""  # finish() after a stop adds nothing
                if not include:
                    assert all(which not in d for d in deltas)


def test_stop_holdback_never_retracts(smollm2):
    text = "abc abd abe ab"
    ids = smollm2.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [], stop=["abx"])
    streamed = ""
    for i in ids:
        streamed += detok.add_tokens([i]).text_delta
        # Only a possible beginning of "abx" is ever held back.
        pending = text[len(streamed):len(smollm2.decode(ids[:ids.index(i) + 1]))]
        assert len(pending) <= 2 and "abx".startswith(pending), (streamed, pending)
    assert streamed == "abc abd abe "           # the trailing "ab" could still become "abx"
    assert detok.finish().text_delta == "ab"    # released when the request ends
    assert detok.output_text == text and detok.stop_string is None


def test_stop_first_token_and_tokens_after_stop(smollm2):
    ids = smollm2.encode("Hello world, and more", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, [], stop=["Hello"])
    d = detok.add_tokens(ids)  # all tokens at once: those after the stop are ignored
    assert d.text_delta == "" and d.stop_string == "Hello" and detok.output_text == ""
    assert detok.num_output_tokens == 1
    with pytest.raises(ValueError, match="finished"):
        detok.add_tokens(ids[:1])
    detok = IncrementalDetokenizer(smollm2, [], stop=["world"], include_stop_str_in_output=True)
    d = detok.add_tokens(ids)
    assert d.text_delta == "Hello world" and detok.num_output_tokens == 2
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smollm2, [], stop=[""])


def test_window_stays_small(smollm2):
    """Per-token work is a small window, not the whole output."""
    sizes = []

    class Counting:
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return smollm2.decode(ids, **kw)

    ids = smollm2.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    assert len(ids) > 400
    deltas, _ = stream(Counting(), ids, prompt=list(range(100, 120)), stop=["never appears"])
    assert "".join(deltas) == smollm2.decode(ids)
    assert max(sizes) <= 12, max(sizes)


def test_numpy_prompt_ids(smollm2):
    import numpy as np

    prompt = np.array(smollm2.encode("Once upon a"), dtype=np.int32)
    ids = smollm2.encode(" time, 你好", add_special_tokens=False)
    deltas, _ = stream(smollm2, ids, prompt)
    assert "".join(deltas) == " time, 你好"
