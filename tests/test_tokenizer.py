"""The tokenizer (edge_rt/tokenizer.py).

  1. token ids equal llama.cpp's (llama-cpp-python, vocab_only) on the whole wikitext-2
     test file for SmolLM2 and Gemma 3, on random strings full of unicode, whitespace
     runs and special-token texts, and on tiny random-vocabulary GGUFs with the qwen2 /
     llama-bpe / gpt-2 / smollm pre-tokenizers; the end-of-generation set and BOS too;
  2. decode(encode(x)) == x, and the stream decoder gives the same text token by token,
     holding back incomplete UTF-8;
  3. chat templates: SmolLM2's own renders; hostile templates end in EdgeRtError quickly;
  4. tokenizer.json (from_hf_json) and gguf_meta() round trips give identical ids;
  5. the qwen2 / llama3 / gpt2 regexes split as llama.cpp's hand-written splitters
     (ported here) on random text, without llama.cpp;
  6. malformed metadata ends in one-line EdgeRtErrors.
"""
from __future__ import annotations

import ctypes
import json
import random
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, pre_tokenizers

from edge_rt import tokenizer as T
from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import GGUFFile
from edge_rt.tokenizer import Tokenizer

try:
    import llama_cpp
except Exception:  # not built / not installed
    llama_cpp = None

needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable: "
                                                         "no llama.cpp ground truth")
WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "test.txt"

SAMPLES = [
    "", " ", "  ", "\n", "\n\n\n", "Hello world", " Hello  world ", "héllo wörld ñ ß Å æ œ",
    "中文字符 日本語のテキスト 한국어 텍스트", "emoji 😀👍🏽🇫🇷❤️‍🔥 done", "combining e\u0301 a\u0308 \u20dd",
    "Arabic-Indic ١٢٣ Devanagari ४५६ and 12345678", "tabs\t\tand\r\nCRLF\x0b\x0c\x85 nbsp\u00a0 ideo\u3000",
    "it's they'RE we'll I'M 'ſ", " @-@ 1 @,@ 000 \n = = Heading = = \n", "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>model <end_of_turn> </s> <s> <table> <0x41> [multimodal]", "▁▁ spaces ▁", " " * 45,
    "\n" * 40 + "x", "\t" * 33, "private use \ue000 noncharacter \uffff plane 16 \U0010fffd tag \U000e0001",
    "Unicode 16 letters \u1c89\ua7cb\U000105c0 digits \U00010d40\U0001e5f1",
]


def _ids_diff(a: list[int], b: list[int]) -> str:
    n = min(len(a), len(b))
    d = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    first = int(d[0]) if len(d) else n
    return f"{len(a)} vs {len(b)} ids, {len(d)} differ in the common length, first difference at {first}"


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text() -> str:
    return WIKITEXT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def smol_meta(smollm2_gguf):
    return GGUFFile(smollm2_gguf).meta


@pytest.fixture(scope="module")
def gemma_meta(gemma3_gguf):
    return GGUFFile(gemma3_gguf).meta


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_gguf_meta(smol_meta)


@pytest.fixture(scope="module")
def gemma(gemma_meta):
    return Tokenizer.from_gguf_meta(gemma_meta)


@pytest.fixture(scope="module")
def models(request):
    """name -> (Tokenizer, gguf path)"""
    return lambda name: (request.getfixturevalue(name),
                         request.getfixturevalue({"smol": "smollm2_gguf", "gemma": "gemma3_gguf"}[name]))


class _Llama:
    """llama.cpp's vocabulary through llama-cpp-python."""

    def __init__(self, path):
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)

    def tokenize(self, s: str, add_special=True, special=False) -> list[int]:
        return self.llm.tokenize(s.encode(), add_bos=add_special, special=special)

    def detokenize(self, ids, special=False) -> str:  # Llama.detokenize cuts pieces at 32 bytes
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        cap = 64 * len(ids) + 64
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, special)
        assert n >= 0
        return buf.raw[:n].decode("utf-8", "replace")

    def eog(self, n) -> set[int]:
        return {i for i in range(n) if llama_cpp.llama_vocab_is_eog(self.vocab, i)}


_llamas: dict = {}


def _llama(path) -> _Llama:
    if str(path) not in _llamas:
        _llamas[str(path)] = _Llama(path)
    return _llamas[str(path)]


def _random_strings(n: int, seed: int, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    pool = (list("abcXYZ '’\"-.,!?;:()[]{}<>/|\\_*&^%$#@~`=+0123456789\t\n\r\x0b\x0c\x85\u00a0\u1680\u2000\u2028"
                 "\u2029\u202f\u3000éüñßøÅæœ中文字日本語한국어😀👍🏽🇫🇷❤️‍🔥\u0301\u0308\u20dd١٢٣४५६ΑΩαωЖжש")
            + ["\u1c89", "\ua7cb", "\U000105c0", "\U00010d40", "\U0001e5f1", "\u0378", "\U000e0001", "\uffff"]
            + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "<s>", "<eos>", "<bos>", "<end_of_turn>",
               "<start_of_turn>", "<table>", "</td>", "[multimodal]", "<0x41>", "<unused3>", "<reponame>", "<tool>",
               "'s", "'T", "'re", "'LL", "'ſ", "  ", "   ", "\n\n", "\t\t", " " * 40, "\n" * 40, "\t" * 35, "▁",
               "▁▁", "\r\n", " \n", "\n ", "12345", " 1", "  a"])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


# --- 1. llama.cpp parity ----------------------------------------------------------------------
@needs_llama
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_wikitext_ids_equal_llama_cpp(name, models, text):
    tok, path = models(name)
    t0 = time.perf_counter()
    got = tok.encode(text)
    t_encode = time.perf_counter() - t0
    want = _llama(path).tokenize(text)  # add_special: BOS where the model adds one, as llama-perplexity
    assert got == want, _ids_diff(got, want)
    print(f"\n{name}: {len(got)} tokens, encoded in {t_encode:.2f} s, equal to llama.cpp")


@needs_llama
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_special_tokens_equal_llama_cpp(name, models):
    tok, path = models(name)
    ll = _llama(path)
    assert tok.eos_ids == ll.eog(tok.n_vocab)
    assert tok.bos_id == ll.llm.token_bos()
    assert tok.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(ll.vocab))
    assert tok.n_vocab == ll.llm.n_vocab()


@needs_llama
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_random_strings_equal_llama_cpp(name, models):
    tok, path = models(name)
    ll = _llama(path)
    bad = []
    for s in SAMPLES + _random_strings(400, seed=1):
        for special in (False, True):
            got, want = tok.encode(s, special=special), ll.tokenize(s, special=special)
            if got != want:
                bad.append((s, special, got, want))
            if ll.detokenize(got, special) != tok.decode(got, special):
                bad.append((s, special, "decode", tok.decode(got, special)))
    assert not bad, f"{len(bad)} differences, first: {bad[0]!r}"


def _fake_bpe_meta(pre: str, n_merges: int = 500) -> dict:
    """A byte-level BPE vocabulary trained on a bit of wikitext (+ special tokens), as
    tokenizer.ggml.* metadata."""
    from tokenizers import Tokenizer as HFT
    from tokenizers import models as hm
    from tokenizers import trainers
    hf = HFT(hm.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tr = trainers.BpeTrainer(vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    sample = WIKITEXT.read_text(encoding="utf-8")[:60000]
    hf.train_from_iterator([sample, "héllo wörld 中文 日本語 😀 ١٢٣ 'S 'll It'S"], tr)
    j = json.loads(hf.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [T.T_NORMAL] * len(tokens)
    for t, typ in (("<|im_start|>", 3), ("<|im_end|>", 3), ("<|endoftext|>", 3), ("<tool>", 4)):
        tokens.append(t)
        types.append(typ)
    n = len(tokens)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": n - 2, "tokenizer.ggml.eos_token_id": n - 3}  # Qwen2's


def _write_fake_gguf(path: Path, meta: dict, arch: str) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(x) for x in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@needs_llama
@pytest.mark.parametrize("pre,arch", [("qwen2", "qwen2"), ("llama-bpe", "llama"), ("gpt-2", "gpt2"),
                                      ("smollm", "llama")])
def test_pre_tokenizers_equal_llama_cpp(pre, arch, tmp_path, text):
    meta = _fake_bpe_meta(pre)
    path = _write_fake_gguf(tmp_path / f"{pre}.gguf", meta, arch)
    tok = Tokenizer.from_gguf_meta(GGUFFile(path).meta)
    ll = _Llama(path)
    assert tok.eos_ids == ll.eog(tok.n_vocab) and tok.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(ll.vocab))
    rng = random.Random(2)
    chunks = [text[i:i + rng.randint(1, 400)] for i in (rng.randrange(len(text) - 400) for _ in range(100))]
    bad = [(s, sp) for s in SAMPLES + _random_strings(400, seed=3, max_len=60) + chunks for sp in (False, True)
           if tok.encode(s, special=sp) != ll.tokenize(s, special=sp)]
    assert not bad, f"{len(bad)} differences, first: {bad[0]!r}"
    big = text[:200000]
    got, want = tok.encode(big), ll.tokenize(big)
    assert got == want, _ids_diff(got, want)


@needs_llama
def test_spm_add_space_prefix_equal_llama_cpp(gemma_meta, tmp_path, text):
    """Gemma's vocabulary with add_space_prefix on (as Llama-2-style SentencePiece models)."""
    import gguf
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for f, v in ((w.add_block_count, 1), (w.add_context_length, 128), (w.add_embedding_length, 8),
                 (w.add_feed_forward_length, 8), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                 (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0)):
        f(v)
    w.add_tokenizer_model("llama")
    w.add_token_list(gemma_meta["tokenizer.ggml.tokens"])
    w.add_token_scores(gemma_meta["tokenizer.ggml.scores"].tolist())
    w.add_token_types(gemma_meta["tokenizer.ggml.token_type"].tolist())
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf_meta(GGUFFile(path).meta)
    assert tok.add_space_prefix and tok.add_bos
    ll = _Llama(path)
    rng = random.Random(7)
    chunks = [text[i:i + rng.randint(1, 400)] for i in (rng.randrange(len(text) - 400) for _ in range(100))]
    bad = []
    for s in SAMPLES + _random_strings(300, seed=8, max_len=60) + chunks:
        for sp in (False, True):
            got = tok.encode(s, special=sp)
            if got != ll.tokenize(s, special=sp):
                bad.append((s, sp))
            if ll.detokenize(got[1:], sp) != tok.decode(got[1:], sp):
                bad.append((s, sp, "decode"))
    assert not bad, f"{len(bad)} differences, first: {bad[0]!r}"
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


# --- 2. decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_decode_round_trip_and_stream(name, models, text):
    tok, _ = models(name)
    paragraphs = [p for p in text.split("\n") if len(p) > 100][:50]
    for s in SAMPLES + _random_strings(200, seed=4) + paragraphs:
        if tok.model == "llama" and T.SPACE in s:  # SentencePiece writes spaces as U+2581: no way back
            continue
        ids = tok.encode(s, add_bos=False)
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s)) == s  # BOS is a control token: no text
        d = tok.stream_decoder()
        pieces = [d.push(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == s
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in s  # nothing emitted half-way


@pytest.mark.parametrize("name", ["smol_meta", "gemma_meta"])
def test_dropped_encoder_decodes_the_same(name, request, text):
    """After drop_encoder() (a one-shot run, its prompt read) every token decodes to the
    same bytes from the compact table, special or not, the chat template (SmolLM2's)
    still renders, and encode refuses in one error."""
    full = Tokenizer.from_gguf_meta(request.getfixturevalue(name))
    ids = full.encode(text[:20000], add_bos=False)
    want = [full._piece(i, special) for special in (False, True) for i in range(full.n_vocab)]
    chat = full.render_chat([{"role": "user", "content": "hi"}]) if full.chat_template else None
    tok = Tokenizer.from_gguf_meta(request.getfixturevalue(name))
    tok.drop_encoder()
    assert tok.hf is None
    assert [tok._piece(i, special) for special in (False, True) for i in range(tok.n_vocab)] == want
    assert tok.decode(ids) == full.decode(ids)
    assert chat is None or tok.render_chat([{"role": "user", "content": "hi"}]) == chat
    assert tok.gguf_meta()["tokenizer.ggml.tokens"] == full.gguf_meta()["tokenizer.ggml.tokens"]
    with pytest.raises(EdgeRtError, match="encoder was dropped"):
        tok.encode("hi")


def test_stream_decoder_holds_back_partial_utf8(gemma, smol):
    byte = [gemma.hf.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    d = gemma.stream_decoder()
    assert [d.push(t) for t in byte] == ["", "", "", "😀"]
    assert d.flush() == ""
    d = gemma.stream_decoder()
    assert d.push(byte[0]) == "" and d.push(byte[1]) == "" and d.flush() == "\ufffd"
    assert gemma.decode(byte[:2] + [gemma.hf.token_to_id("<0x41>")]) == "\ufffdA"
    # byte-level BPE: the single-byte tokens of a 4-byte character
    ids = [smol.hf.token_to_id(T._BYTE_ENCODER[b]) for b in "𝄞".encode()]
    d = smol.stream_decoder()
    assert [d.push(t) for t in ids] == ["", "", "", "𝄞"]


def test_decode_hides_control_tokens(smol, gemma):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>", special=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert smol.decode(ids) == "user\nhi"
    assert smol.decode(ids, special=True) == "<|im_start|>user\nhi<|im_end|>"
    assert gemma.decode([gemma.bos_id] + gemma.encode("a b", add_bos=False)) == "a b"
    with pytest.raises(EdgeRtError, match="out of range"):
        smol.decode([smol.n_vocab])


# --- 3. chat templates -------------------------------------------------------------------------------
def test_smollm2_chat_template(smol):
    out = smol.render_chat([{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = smol.encode(out, special=True)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    assert 1 not in smol.encode(out)  # not parsed by default (as llama-perplexity)
    out2 = smol.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                            add_generation_prompt=False)
    assert out2 == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_no_chat_template(gemma):
    assert not gemma.chat_template  # this GGUF carries none
    with pytest.raises(EdgeRtError, match="no chat template"):
        gemma.render_chat([{"role": "user", "content": "Hi"}])


GEMMA_STYLE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
               "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
               "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
               "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = "
               "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
               "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
TOOLS_STYLE = ("{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if m.role == 'tool' -%}{%- continue -%}"
               "{%- endif -%}{%- set ns.n = ns.n + 1 -%}[{{ m.role }}:{{ m.content | tojson }}]{%- endfor -%}"
               "{%- if tools %}{{ tools | tojson }}{% endif -%} n={{ ns.n }}")


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    t = Tokenizer.__new__(Tokenizer)
    t.__dict__.update(tok.__dict__)
    t.chat_template, t._template_cache = template, None
    return t


def test_benign_templates(smol):
    g = _with_template(smol, GEMMA_STYLE)
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "é"}]
    assert g.render_chat(msgs) == ("<|im_start|><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo"
                                   "<end_of_turn>\n<start_of_turn>user\né<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(EdgeRtError, match="roles must alternate"):
        g.render_chat(msgs[:1] * 2)
    t = _with_template(smol, TOOLS_STYLE)
    out = t.render_chat([{"role": "user", "content": "a\"é"}, {"role": "tool", "content": "x"}],
                        tools=[{"name": "f"}])
    assert out == '[user:"a\\"é"][{"name": "f"}]n=1'


HOSTILE = {
    "attribute": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__['__builtins__'] }}",
    "mutation": "{% set l = [] %}{{ l.append(1) }}",
    "range 10^9": "{% for i in range(1000000000) %}x{% endfor %}",
    "nested loops 10^10": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "output flood": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "string repeat": "{{ 'x' * 1000000000 }}",
    "power": "{{ 10 ** 100000000 }}",
    "namespace doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s }}",
    "macro doubling": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "center filter": "{{ 'x' | center(1000000000) }}",
    "ljust method": "{{ 'x'.ljust(1000000000) }}",
    "printf width": "{{ '%01000000000d' % 1 }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "replace growth": "{% set a = 'x' * 1000000 %}{{ a.replace('x', a) }}",
    "join growth": "{% set a = 'x' * 1000000 %}{{ [a, a, a] | join }}",
    "syntax": "{% for %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_refused(name, smol):
    t = _with_template(smol, HOSTILE[name])
    t0 = time.perf_counter()
    try:
        out = t.render_chat([{"role": "user", "content": "Hi"}])
    except EdgeRtError as e:
        assert "\n" not in str(e)
    else:  # the sandbox may also render an unsafe attribute as nothing: never its value
        assert name == "globals" and out == ""
    assert time.perf_counter() - t0 < 10


# --- 4. tokenizer.json and GGUF round trips -------------------------------------------------------------
def _config(tok: Tokenizer) -> dict:
    return {"bos_token": tok.bos_text, "eos_token": tok.token_text(tok.eos_id), "add_bos_token": tok.add_bos,
            "chat_template": tok.chat_template}


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_hf_json_round_trip(name, models, text, tmp_path):
    tok, _ = models(name)
    part = text[:150000]
    want = tok.encode(part)
    js = tok.hf.to_str()
    tok2 = Tokenizer.from_hf_json(js, _config(tok))
    assert tok2.encode(part) == want
    assert [tok2.encode(s, special=True) for s in SAMPLES] == [tok.encode(s, special=True) for s in SAMPLES]
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos, tok2.eos_ids, tok2.n_vocab, tok2.chat_template) == \
           (tok.bos_id, tok.eos_id, tok.add_bos, tok.eos_ids, tok.n_vocab, tok.chat_template)
    # a GGUF written from the tokenizer.json encodes the same, and so does a path
    tok3 = Tokenizer.from_gguf_meta(tok2.gguf_meta())
    assert tok3.encode(part) == want
    p = tmp_path / "tokenizer.json"
    p.write_text(js, encoding="utf-8")
    if name == "smol":
        assert Tokenizer.from_hf_json(p, _config(tok)).encode(part) == want


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_gguf_meta_round_trip(name, models, request, text):
    tok, _ = models(name)
    src = request.getfixturevalue(f"{name}_meta")
    m = tok.gguf_meta()
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert m.get(k) == src.get(k), k
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges"):
        assert (k in m) == (k in src) and (k not in m or list(np.asarray(m[k]).tolist()) ==
                                           list(np.asarray(src[k]).tolist())), k
    assert Tokenizer.from_gguf_meta(m).encode(text[:100000]) == tok.encode(text[:100000])


def test_hf_native_pre_tokenizers(smol, text):
    """tokenizer.json files as Hugging Face writes them map to llama.cpp's pre names."""
    part = text[:50000]
    j = json.loads(smol.hf.to_str())
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    tok = Tokenizer.from_hf_json(json.dumps(j), _config(smol))
    assert tok.pre == "smollm" and tok.encode(part) == smol.encode(part)

    q = Tokenizer.from_gguf_meta(_fake_bpe_meta("qwen2"))
    j = json.loads(q.hf.to_str())
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
                                               " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    q2 = Tokenizer.from_hf_json(json.dumps(j), {"eos_token": "<|im_end|>"})
    assert q2.pre == "qwen2" and q2.encode(part) == q.encode(part)
    j["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(EdgeRtError, match="pre-tokenizer"):
        Tokenizer.from_hf_json(json.dumps(j))


# --- 5. llama.cpp's hand-written splitters, ported -------------------------------------------------------
_WS = {chr(c) for c in (9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000)}


def _ref_split(text: str, kind: str) -> list[str]:
    """unicode_regex_split_custom_{gpt2,qwen2,llama3} of llama.cpp's unicode.cpp (for code
    points whose category Python's unicodedata and llama.cpp agree on)."""
    n, out, pos, prev = len(text), [], 0, 0

    def cpt(i):
        return text[i] if 0 <= i < n else None

    def f(i):  # (letter, number, whitespace, in range)
        if not 0 <= i < n:
            return (False, False, False, False)
        c = unicodedata.category(text[i])
        return (c[0] == "L", c[0] == "N", text[i] in _WS, True)

    def add(end):
        nonlocal prev
        ln = end - prev
        if ln > 0:
            out.append(text[prev:end])
        prev = end
        return ln

    while pos < n:
        c, fl = cpt(pos), f(pos)
        if c == "'" and pos + 1 < n:
            c1 = cpt(pos + 1) if kind == "gpt2" else cpt(pos + 1).lower()
            if c1 in ("s", "t", "m", "d"):
                pos += add(pos + 2)
                continue
            if pos + 2 < n:
                c2 = cpt(pos + 2) if kind == "gpt2" else cpt(pos + 2).lower()
                if (c1, c2) in (("r", "e"), ("v", "e"), ("l", "l")):
                    pos += add(pos + 3)
                    continue
        if kind == "gpt2":
            f2 = f(pos + 1) if c == " " else fl
            if f2[0]:
                pos += c == " "
                while f(pos)[0]:
                    pos += 1
                add(pos)
                continue
            if f2[1]:
                pos += c == " "
                while f(pos)[1]:
                    pos += 1
                add(pos)
                continue
            if not (f2[0] or f2[1] or f2[2]) and f2[3]:
                pos += c == " "
                while (g := f(pos)) and not (g[0] or g[1] or g[2]) and g[3]:
                    pos += 1
                add(pos)
                continue
        else:
            if not (c in "\r\n" or fl[1]) and (fl[0] or f(pos + 1)[0]):
                pos += 1
                while f(pos)[0]:
                    pos += 1
                add(pos)
                continue
            if fl[1]:
                if kind == "qwen2":
                    pos += 1
                    add(pos)
                else:
                    ini = pos
                    while f(pos)[1]:
                        pos += 1
                        if pos - ini >= 3:
                            add(pos)
                            ini = pos
                    add(pos)
                continue
            f2 = f(pos + 1) if c == " " else fl
            if not (f2[0] or f2[1] or f2[2]) and fl[3]:
                pos += c == " "
                while (g := f(pos)) and not (g[0] or g[1] or g[2]) and g[3]:
                    pos += 1
                while cpt(pos) in ("\r", "\n"):
                    pos += 1
                add(pos)
                continue
        nws, last_rn = 0, 0
        while f(pos + nws)[2]:
            if kind != "gpt2" and cpt(pos + nws) in ("\r", "\n"):
                last_rn = pos + nws + 1
            nws += 1
        if last_rn > 0:
            pos = last_rn
            add(pos)
            continue
        if nws > 1 and cpt(pos + nws) is not None:
            pos += nws - 1
            add(pos)
            continue
        if nws > 0:
            pos += nws
            add(pos)
            continue
        pos += 1
        add(pos)
    return out


@pytest.mark.parametrize("kind,regex", [("gpt2", T._RE_GPT2), ("qwen2", T._RE_QWEN2), ("llama3", T._RE_LLAMA3)])
def test_regexes_split_as_llama_cpp(kind, regex, text):
    split = pre_tokenizers.Split(Regex(regex), "isolated")
    rng = random.Random(5)
    pool = list(" \t\n\r\x0b\x0c\x85\u00a0\u3000\u2028abcXYZé中ж😀'’.,!?-_()0123456789١٢\u0301") + \
        ["'s", "'S", "'re", "'RE", "'ll", "'Ve", "'d", "'M", "  ", "\r\n", " \n ", "   x", "123456"]
    samples = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 50))) for _ in range(2000)]
    samples += [text[i:i + 300] for i in range(0, 300000, 3000)]
    bad = [s for s in samples if [p for p, _ in split.pre_tokenize_str(s)] != _ref_split(s, kind)]
    assert not bad, f"{len(bad)} differences, first: {bad[0]!r}"


def test_qwen2_random_vocab_round_trip():
    tok = Tokenizer.from_gguf_meta(_fake_bpe_meta("qwen2"))
    assert tok.pre == "qwen2" and not tok.add_bos
    assert tok.eos_ids == {tok.hf.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for s in SAMPLES + _random_strings(300, seed=6, max_len=80):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        d = tok.stream_decoder()
        assert "".join(d.push(t) for t in ids) + d.flush() == s
    assert tok.encode("<tool>x")[0] == tok.hf.token_to_id("<tool>")  # user-defined: always cut out
    assert tok.encode("<|im_end|>")[0] != tok.hf.token_to_id("<|im_end|>")  # control: text unless special=True
    assert tok.encode("<|im_end|>", special=True) == [tok.hf.token_to_id("<|im_end|>")]


# --- 6. malformed metadata --------------------------------------------------------------------------------
def _broken(base: dict, **changes) -> dict:
    m = dict(base)
    for k, v in changes.items():
        key = "tokenizer." + k.replace("__", ".")
        if v is None:
            m.pop(key, None)
        else:
            m[key] = v
    return m


@pytest.mark.parametrize("changes,match", [
    ({"ggml__model": None}, "tokenizer.ggml.model is missing"),
    ({"ggml__model": "bert"}, "unsupported tokenizer model"),
    ({"ggml__pre": "nonsense"}, "unsupported pre-tokenizer"),
    ({"ggml__pre": None}, "tokenizer.ggml.pre is missing"),
    ({"ggml__tokens": None}, "no tokenizer.ggml.tokens"),
    ({"ggml__tokens": "abc"}, "not an array of strings"),
    ({"ggml__tokens": []}, "is empty"),
    ({"ggml__merges": None}, "no tokenizer.ggml.merges"),
    ({"ggml__token_type": np.ones(3, np.int32)}, "has 3 entries"),
    ({"ggml__token_type": ["a"]}, "not a numeric array"),
    ({"ggml__bos_token_id": "x"}, "not an integer"),
    ({"chat_template": 5}, "not a string"),
])
def test_malformed_metadata(changes, match):
    base = _fake_bpe_meta("qwen2", n_merges=50)
    with pytest.raises(EdgeRtError, match=match) as e:
        Tokenizer.from_gguf_meta(_broken(base, **changes))
    assert "\n" not in str(e.value)


def test_malformed_metadata_duplicates_and_json():
    base = _fake_bpe_meta("qwen2", n_merges=50)
    toks = list(base["tokenizer.ggml.tokens"])
    toks[5] = toks[6]
    with pytest.raises(EdgeRtError, match="duplicate token"):
        Tokenizer.from_gguf_meta(_broken(base, ggml__tokens=toks))
    with pytest.raises(EdgeRtError, match="not JSON"):
        Tokenizer.from_hf_json("{nope")
    with pytest.raises(EdgeRtError, match="unsupported model"):
        Tokenizer.from_hf_json(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(EdgeRtError, match="not contiguous"):
        Tokenizer.from_hf_json(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2}, "merges": []},
                                           "pre_tokenizer": {"type": "ByteLevel"}}))


# --- timings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_build_and_encode_time(name, request, text):
    meta = request.getfixturevalue(f"{name}_meta")
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf_meta(meta)
    t1 = time.perf_counter()
    tok.encode(text)
    t2 = time.perf_counter()
    print(f"\n{name}: build {t1 - t0:.2f} s, encode wikitext-2 test ({len(text) / 1e6:.2f} MB) {t2 - t1:.2f} s")
    assert t1 - t0 < 30 and t2 - t1 < 30  # seconds on a busy 2-core machine; typically 0.3-3 s each


def test_encode_rejects_lone_surrogates(smol):
    with pytest.raises(EdgeRtError, match="not valid Unicode"):
        smol.encode("a\udcffb")
