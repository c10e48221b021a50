"""The tokenizer: a Hugging Face `tokenizers.Tokenizer` built from a GGUF file's
tokenizer.ggml.* metadata so that its token ids equal llama.cpp's.

What llama.cpp does (src/llama-vocab.cpp, src/unicode.cpp) and how it is mirrored here:

* Special-token partition. Before the model runs, llama.cpp cuts the text at every
  occurrence of a "special" token (longest texts first). With parse_special=false (what
  llama-perplexity and `encode` here do) CONTROL and UNKNOWN tokens are *not* cut out,
  USER_DEFINED ones still are (Gemma's "\\n\\n", runs of spaces, "<table>", ...). Here:
  CONTROL/UNKNOWN tokens are HF added tokens with special=True and
  `encode_special_tokens` is on; USER_DEFINED tokens are HF added tokens with
  special=False, which HF always cuts out. Before that, the token attributes are adjusted
  exactly as llama.cpp's loader does: tokens whose text is on its end-of-generation /
  end-of-turn / fill-in-the-middle lists become CONTROL (so Gemma 3's "</s>", a
  user-defined token in the file, is not cut out), and those lists make `eos_ids`.

* "gpt2" models (byte-level BPE, SmolLM2, Qwen2, Llama 3): the `tokenizer.ggml.pre` name
  selects llama.cpp's pre-tokenizer regexes, applied in sequence (HF Split, "isolated"),
  then the GPT-2 byte mapping (HF ByteLevel without its own regex) and BPE with the
  file's merges in rank order (HF BPE: lowest rank first, leftmost on ties, as llama.cpp).
  llama.cpp classifies code points with its own Unicode tables (Unicode 15.1), the
  `tokenizers` regex engine (Oniguruma) with Unicode 16: the 4302 letters and 80 digits
  that are new in Unicode 16 are removed from \\p{L} / \\p{N} with class intersections, so
  the regexes classify every code point as llama.cpp does (checked over all code points
  against llama.cpp's unicode-data.cpp).

* "llama" models (SentencePiece, Gemma): llama.cpp's SPM tokenizer replaces " " by
  U+2581 (and, with add_space_prefix, prepends one to every text fragment), splits into
  UTF-8 characters and repeatedly merges the adjacent pair whose concatenation is a
  token with the highest score (leftmost on ties); characters left alone that are not
  tokens become <0xXX> byte tokens. That is BPE where every split (a, b) of every token
  t, a and b tokens, is a merge, ranked by t's score: HF BPE with those merges and
  byte_fallback gives the same ids (HF's Unigram model would not: it is Viterbi, not
  greedy merging). Exact except in two corner cases, met neither on wikitext nor in the
  random tests: two *different* tokens with equal scores (Gemma's control tokens: all
  -1000) competing for overlapping pairs (llama.cpp: leftmost; here: the lower token
  id), and a token that can only be built from a character that is not itself a token
  (SentencePiece vocabularies hold every character of their pieces; Gemma 3 lacks only
  " ", which appears only in user-defined tokens, which are cut out before merging).

* Decoding is llama.cpp's token_to_piece, token by token: control tokens give nothing
  unless special=True, user-defined ones their text, byte tokens their byte. Unlike
  llama_detokenize there is no "clean_spaces" pass (gpt-2 / llama-bpe vocabularies), so
  decode(encode(x)) == x, and the space added by add_space_prefix is stripped after BOS.

Verified equal to llama.cpp (llama-cpp-python 0.3.36) on the whole wikitext-2 test file
for SmolLM2-135M and Gemma-3-270m, on random unicode text, and on small vocabularies with
the qwen2 / llama-bpe / gpt-2 / smollm pre-tokenizers (tests/test_tokenizer.py).
"""
from __future__ import annotations

import codecs
import datetime
import json
import os
import re
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from functools import wraps
from typing import Any, Iterable

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import EdgeRtError

# --- token types (GGUF tokenizer.ggml.token_type) and llama.cpp token attributes --------
T_NORMAL, T_UNKNOWN, T_CONTROL, T_USER_DEFINED, T_UNUSED, T_BYTE = 1, 2, 3, 4, 5, 6
A_UNKNOWN, A_UNUSED, A_NORMAL, A_CONTROL, A_USER_DEFINED, A_BYTE = 1, 2, 4, 8, 16, 32
_TYPE_TO_ATTR = {T_NORMAL: A_NORMAL, T_UNKNOWN: A_UNKNOWN, T_CONTROL: A_CONTROL,
                 T_USER_DEFINED: A_USER_DEFINED, T_UNUSED: A_UNUSED, T_BYTE: A_BYTE}

SPACE = "\u2581"  # SentencePiece's visible space

# --- llama.cpp's character classes, in Oniguruma syntax ------------------------------------
# Code points that are letters / numbers in Unicode 16 (Oniguruma) but unassigned in
# llama.cpp's tables (unicode-data.cpp, Unicode 15.1).
_NEW_L = ("1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 11380-11389 "
          "1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 13460-143FA 16100-1611D 16D40-16D6C "
          "18CFF 1E5D0-1E5ED 1E5F0")
_NEW_N = "10D40-10D49 116D0-116E3 11BF0-11BF9 16130-16139 16D70-16D79 1CCF0-1CCF9 1E5F1-1E5FA"


def _ranges(spec: str) -> str:
    return "".join("-".join(f"\\x{{{p}}}" for p in r.split("-")) for r in spec.split())


_XL, _XN = _ranges(_NEW_L), _ranges(_NEW_N)
L = f"[\\p{{L}}&&[^{_XL}]]"                      # \p{L}
N = f"[\\p{{N}}&&[^{_XN}]]"                      # \p{N}
NOT_SLN = f"[[^\\s\\p{{L}}\\p{{N}}]{_XL}{_XN}]"  # [^\s\p{L}\p{N}]
NOT_RNLN = f"[[^\\r\\n\\p{{L}}\\p{{N}}]{_XL}{_XN}]"  # [^\r\n\p{L}\p{N}]

# llama.cpp's regexes (llm_tokenizer_bpe), with the classes above
_RE_GPT2 = f"'s|'t|'re|'ve|'m|'ll|'d| ?{L}+| ?{N}+| ?{NOT_SLN}+|\\s+(?!\\S)|\\s+"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_QWEN2 = f"{_CONTRACTIONS}|{NOT_RNLN}?{L}+|{N}| ?{NOT_SLN}+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_RE_LLAMA3 = f"{_CONTRACTIONS}|{NOT_RNLN}?{L}+|{N}{{1,3}}| ?{NOT_SLN}+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


class _Pre:
    def __init__(self, name: str, regexes: list[str], ignore_merges: bool = False, add_bos: bool = False):
        self.name, self.regexes, self.ignore_merges, self.add_bos = name, regexes, ignore_merges, add_bos


# tokenizer.ggml.pre -> llama.cpp's pre-tokenizer (only those verified here)
_PRE_GROUPS = [
    (_Pre("gpt2", [_RE_GPT2]), ("gpt-2", "phi-2", "mpt", "olmo")),
    (_Pre("smollm", [N, _RE_GPT2]), ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                     "minerva-7b")),
    (_Pre("qwen2", [_RE_QWEN2]), ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                                   "hunyuan", "solar-open")),
    (_Pre("llama3", [_RE_LLAMA3], ignore_merges=True, add_bos=True),
     ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")),
]
_PRE_BY_NAME = {n: p for p, names in _PRE_GROUPS for n in names}
_KNOWN_REGEXES = {r for p, _ in _PRE_GROUPS for r in p.regexes}

# llama.cpp's token auto-detection by text (llama_vocab::impl::load)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                  "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                  "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                  "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss hack

_SPECIAL_KEYS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask",
                 "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")


# --- GPT-2 byte mapping ---------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODE_TABLE = {ord(c): b for b, c in _BYTE_ENCODER.items()}  # for str.translate -> latin-1


def _fail(msg: str):
    raise EdgeRtError(msg)


# --- reading and checking the metadata ------------------------------------------------------
def _as_str_list(meta: dict, key: str, where: str) -> list[str]:
    v = meta.get(key)
    if v is None:
        _fail(f"{where}: tokenizer metadata has no {key}")
    if isinstance(v, np.ndarray) or not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        _fail(f"{where}: {key} is not an array of strings")
    return v if isinstance(v, list) else list(v)  # (not copied: Gemma-3's tokens are 2 MiB of pointers)


def _as_num_array(meta: dict, key: str, n: int, dtype, where: str) -> np.ndarray | None:
    v = meta.get(key)
    if v is None:
        return None
    try:
        a = np.asarray(v)
        if a.ndim != 1 or a.dtype.kind not in "iuf":
            raise ValueError
        a = a.astype(dtype)
    except (ValueError, TypeError):
        _fail(f"{where}: {key} is not a numeric array")
    if len(a) < n:
        _fail(f"{where}: {key} has {len(a)} entries for {n} tokens")
    return a[:n]


def _as_int(meta: dict, key: str, where: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        _fail(f"{where}: {key} is not an integer")
    return int(v)


def _as_bool(meta: dict, key: str, default: bool, where: str) -> bool:
    v = meta.get(key)
    if v is None:
        return default
    if not isinstance(v, (bool, np.bool_, int, np.integer)):
        _fail(f"{where}: {key} is not a boolean")
    return bool(v)


# --- SPM scores -> BPE merges -----------------------------------------------------------------
SPM_CHUNK = 1 << 15  # tokens hashed at once: bounds the transient arrays (~100 bytes a character)


def _spm_merges(tokens: list[str], scores: np.ndarray) -> Sequence[tuple[str, str]]:
    """Every split (a, b) of every token t with a and b tokens, ordered by t's score
    (highest first), then t's id, then the split position. Vectorized: polynomial hashes
    of every prefix/suffix are looked up among the tokens' hashes, and each candidate is
    checked on the strings. Tokens are hashed SPM_CHUNK at a time, so a 262k vocabulary
    does not hold arrays of all its splits at once (their memory would stay with the
    allocator and count against the budget)."""
    n = len(tokens)
    lens = np.fromiter(map(len, tokens), np.int64, n)
    maxlen = int(lens.max()) if n else 0
    base = 0x9E3779B97F4A7C15
    inv = pow(base, -1, 1 << 64)
    with np.errstate(over="ignore"):
        pw = np.ones(maxlen + 1, np.uint64)
        ipw = np.ones(maxlen + 1, np.uint64)
        b, ib = np.uint64(base), np.uint64(inv)
        for k in range(1, maxlen + 1):
            pw[k] = pw[k - 1] * b
            ipw[k] = ipw[k - 1] * ib

    def prefix_hashes(lo, hi):
        """(cum, starts) for tokens lo..hi-1: the hash of token t's characters i..j-1
        (times pw[i]) is cum[starts[t] + j] - cum[starts[t] + i]."""
        ln = lens[lo:hi]
        buf = np.frombuffer("".join(tokens[lo:hi]).encode("utf-32-le"), np.uint32).astype(np.uint64)
        starts = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(ln, out=starts[1:])
        pos = np.arange(len(buf), dtype=np.int64) - np.repeat(starts[:-1], ln)
        cum = np.zeros(len(buf) + 1, np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum((buf + np.uint64(1)) * pw[pos], out=cum[1:])
        return cum, starts

    chunks = [(lo, min(lo + SPM_CHUNK, n)) for lo in range(0, n, SPM_CHUNK)]
    full = np.zeros(n, np.uint64)
    for lo, hi in chunks:
        cum, starts = prefix_hashes(lo, hi)
        full[lo:hi] = cum[starts[1:]] - cum[starts[:-1]]
    order = np.argsort(full, kind="stable")
    sorted_h = full[order]

    def lookup(h, length):
        j = np.minimum(np.searchsorted(sorted_h, h), max(n - 1, 0))
        cand = order[j]
        return (sorted_h[j] == h) & (lens[cand] == length), cand

    found = []
    for lo, hi in chunks:
        cum, starts = prefix_hashes(lo, hi)
        nsplit = np.maximum(lens[lo:hi] - 1, 0)
        local = np.repeat(np.arange(hi - lo, dtype=np.int64), nsplit)
        k = np.arange(int(nsplit.sum()), dtype=np.int64) - np.repeat(np.cumsum(nsplit) - nsplit, nsplit) + 1
        st = starts[local]
        with np.errstate(over="ignore"):
            hpre = cum[st + k] - cum[st]
            hsuf = (full[lo + local] - hpre) * ipw[k]
        tok = lo + local
        oka, ia = lookup(hpre, k)
        tok, ia, k, hsuf = tok[oka], ia[oka], k[oka], hsuf[oka]
        okb, ib_ = lookup(hsuf, lens[tok] - k)
        found.append((tok[okb], ia[okb], ib_[okb], k[okb]))
    tok, ia, ib_, k = (np.concatenate(c) for c in zip(*found)) if found else (np.zeros(0, np.int64),) * 4
    o = np.lexsort((k, tok, -scores[tok].astype(np.float64)))
    tok, ia, ib_ = tok[o], ia[o].astype(np.int32), ib_[o].astype(np.int32)
    exact = np.zeros(len(o), bool)
    for s in range(0, len(o), SPM_CHUNK):  # (as Python ints a few at a time, for the same reason)
        exact[s:s + SPM_CHUNK] = [tokens[a] + tokens[c] == tokens[t] for t, a, c in  # the hash is only a filter
                                  zip(tok[s:s + SPM_CHUNK].tolist(), ia[s:s + SPM_CHUNK].tolist(),
                                      ib_[s:s + SPM_CHUNK].tolist())]
    return _Pairs(tokens, ia[exact], ib_[exact])


class _Pairs(Sequence):
    """The merges (tokens[a[i]], tokens[b[i]]), made one at a time as the BPE model reads
    them: as a list of tuples, Gemma-3's 515k SPM pairs would hold ~40 MiB more while it is
    built."""

    def __init__(self, tokens: list[str], a: np.ndarray, b: np.ndarray):
        self.tokens, self.a, self.b = tokens, a, b

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.tokens[self.a[i]], self.tokens[self.b[i]]

    def __iter__(self):
        t = self.tokens
        for s in range(0, len(self.a), SPM_CHUNK):
            for a, b in zip(self.a[s:s + SPM_CHUNK].tolist(), self.b[s:s + SPM_CHUNK].tolist()):
                yield t[a], t[b]


def _bpe_pairs(tokens: list[str], vocab: dict[str, int], merges: list[str]) -> Sequence[tuple[str, str]]:
    """The merges as llama.cpp reads them: split at the first space after position 0, the
    first rank of a pair winning; those whose parts or result are not tokens are dropped
    (they cannot produce a token id)."""
    a, b = array("i"), array("i")
    for m in merges:
        i = m.find(" ", 1)
        if i < 0:
            continue
        x, y = m[:i], m[i + 1:]
        if x in vocab and y in vocab and x + y in vocab:
            a.append(vocab[x])
            b.append(vocab[y])
    a, b = np.frombuffer(a, np.int32), np.frombuffer(b, np.int32)
    first = np.sort(np.unique(a.astype(np.int64) * len(tokens) + b, return_index=True)[1])
    return _Pairs(tokens, a[first], b[first])


def _build_bpe(tokens: list[str], vocab: dict[str, int], pre: _Pre, merges: list[str]) -> HFTokenizer:
    pairs = _bpe_pairs(tokens, vocab, merges)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


class _Texts(Sequence):
    """A list of strings kept as one UTF-8 buffer and offsets (as str objects, SmolLM2's
    49k merges take ~4 MiB); lone surrogates (from a tokenizer.json) round-trip."""

    def __init__(self, texts: Iterable[str]):
        data = [t.encode("utf-8", "surrogatepass") for t in texts]
        self.ends = np.cumsum(np.fromiter(map(len, data), np.int64, len(data)))
        self.data = b"".join(data)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.data[start:int(self.ends[i])].decode("utf-8", "surrogatepass")


# The metadata arrays a Tokenizer holds in its own form once built (a GGUFFile's meta need not
# keep them: Gemma-3's 262k token texts are ~27 MiB as Python strings); gguf_meta() rebuilds them.
ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")
_REBUILT = {"gpt2": set(ARRAY_KEYS), "llama": set(ARRAY_KEYS) - {"tokenizer.ggml.merges"}}


# --- the tokenizer --------------------------------------------------------------------------
PIECE_CHARS = 1 << 16
_PIECE_END = re.compile(r"\n(?= ?\S)")


def _pieces(text: str):
    """Long text in pieces of about PIECE_CHARS, each ending with a newline followed by
    a word (with at most one space before it): no token spans such a point (the
    pre-tokenizers split there, and tokens holding a newline hold only whitespace), so
    the ids are those of the whole text (tests/test_tokenizer.py checks both files),
    while the memory of one encode call (~75 bytes a character, kept by the allocator
    afterwards) stays bounded."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        m = _PIECE_END.search(text, start + PIECE_CHARS)
        if not m:
            break
        yield text[start:m.end()]
        start = m.end()
    yield text[start:]


class Tokenizer:
    """Text <-> token ids as llama.cpp does, on a `tokenizers.Tokenizer` (`self.hf`);
    after drop_encoder(), ids -> text only, from a compact table of the token texts."""

    hf: HFTokenizer | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    eos_ids: set[int]
    n_vocab: int
    chat_template: str | None

    def __init__(self):  # use from_gguf_meta / from_hf_json
        self._lock = threading.Lock()
        self._pieces: dict[int, bytes] = {}  # token_to_piece of the tokens decoded so far
        self._template_cache: tuple[str, Any] | None = None
        self._texts: _Texts | None = None  # the token texts once the encoder is dropped

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_gguf_meta(cls, meta: dict, where: str | None = None) -> "Tokenizer":
        """From a GGUF metadata dict (GGUFFile(path).meta)."""
        where = where or str(meta.get("general.name") or "GGUF")
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            _fail(f"{where}: no tokenizer in the metadata (tokenizer.ggml.model is missing)")
        if model not in ("gpt2", "llama"):
            _fail(f"{where}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")
        tokens = _as_str_list(meta, "tokenizer.ggml.tokens", where)
        n = len(tokens)
        if n == 0:
            _fail(f"{where}: tokenizer.ggml.tokens is empty")
        if not all(tokens):  # llama.cpp renames empty tokens
            tokens = [s or f"[EMPTY_{i}]" for i, s in enumerate(tokens)]
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            dup = next(s for i, s in enumerate(tokens) if vocab[s] != i)
            _fail(f"{where}: tokenizer.ggml.tokens has duplicate token {dup!r}")
        types = _as_num_array(meta, "tokenizer.ggml.token_type", n, np.int32, where)
        if types is None:
            types = np.full(n, T_NORMAL, np.int32)
        scores = _as_num_array(meta, "tokenizer.ggml.scores", n, np.float32, where)

        self = cls()
        self.model = model
        self.n_vocab = n
        self._types = types.astype(np.uint8) if ((types >= 0) & (types < 256)).all() else types  # for gguf_meta()
        self._src_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.") and k not in _REBUILT[model]}
        self.chat_template = meta.get("tokenizer.chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            _fail(f"{where}: tokenizer.chat_template is not a string")
        self.name = where

        if model == "gpt2":
            pre_name = meta.get("tokenizer.ggml.pre")
            if not isinstance(pre_name, str) or not pre_name:
                _fail(f"{where}: tokenizer.ggml.pre is missing (llama.cpp's 'default' pre-tokenizer is not "
                      f"supported)")
            pre = _PRE_BY_NAME.get(pre_name)
            if pre is None:
                _fail(f"{where}: unsupported pre-tokenizer {pre_name!r} (supported: {', '.join(_PRE_BY_NAME)})")
            self.pre = pre_name
            bos, eos, unk = 11, 11, None
            add_bos, add_space_prefix = pre.add_bos, False
        else:
            self.pre = "default"
            bos, eos, unk = 1, 2, 0
            add_bos, add_space_prefix = True, True
            pre = None
            if scores is None:
                scores = np.zeros(n, np.float32)
        self._scores = scores
        add_space_prefix = _as_bool(meta, "tokenizer.ggml.add_space_prefix", add_space_prefix, where)
        self.add_space_prefix = add_space_prefix and model == "llama"

        # special ids (out-of-range defaults are dropped, as llama.cpp does)
        special: dict[str, int | None] = {k: None for k in _SPECIAL_KEYS}
        special.update(bos=bos, eos=eos, unknown=unk)
        for k in special:
            if special[k] is not None and not 0 <= special[k] < n:
                special[k] = None
            v = _as_int(meta, f"tokenizer.ggml.{k}_token_id", where)
            if v is not None and 0 <= v < n:
                special[k] = v
        for old, new in (("prefix", "fim_pre"), ("suffix", "fim_suf"), ("middle", "fim_mid")):
            v = _as_int(meta, f"tokenizer.ggml.{old}_token_id", where)
            if v is not None and 0 <= v < n:
                special[new] = v
        self.add_bos = _as_bool(meta, "tokenizer.ggml.add_bos_token", add_bos, where)
        self.add_eos = _as_bool(meta, "tokenizer.ggml.add_eos_token", False, where)

        attr = np.zeros(n, np.uint8)
        for t, a in _TYPE_TO_ATTR.items():
            attr[types == t] = a
        self._adjust_attrs(tokens, vocab, attr, special)
        self._attr = attr
        self.bos_id, self.eos_id, self.unk_id = special["bos"], special["eos"], special["unknown"]
        if self.add_bos and self.bos_id is None:
            _fail(f"{where}: add_bos_token is set but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            _fail(f"{where}: add_eos_token is set but there is no EOS token")
        self._special = special

        if model == "gpt2":
            merges = _as_str_list(meta, "tokenizer.ggml.merges", where)
            self._merges = _Texts(merges)
            self.hf = _build_bpe(tokens, vocab, pre, merges)
        else:
            self._merges = None
            self.hf = self._build_spm(tokens, vocab)
        self._add_tokens(tokens)  # from here on, token texts come from self.hf: no Python copy of the vocabulary
        return self

    def _adjust_attrs(self, tokens: list[str], vocab: dict[str, int], attr: np.ndarray, special: dict) -> None:
        """llama.cpp's loader: auto-detected EOT/EOM/FIM tokens and every end-of-generation
        text become CONTROL; the EOG set."""

        def find(texts):
            ids = [vocab[t] for t in texts if t in vocab]
            return min(ids) if ids else None

        for key, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pre", _FIM_PRE_TEXTS),
                           ("fim_suf", _FIM_SUF_TEXTS), ("fim_mid", _FIM_MID_TEXTS), ("fim_pad", _FIM_PAD_TEXTS),
                           ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS)):
            if special[key] is None:
                tid = find(texts)
                if tid is not None:
                    special[key] = tid
                    attr[tid] |= A_CONTROL
        eog = {special[k] for k in ("fim_pad", "fim_rep", "fim_sep") if special[k] is not None}
        for t in _EOG_TEXTS:
            if t in vocab:
                eog.add(vocab[t])
                attr[vocab[t]] |= A_CONTROL
        for t in _ALWAYS_USER_DEFINED:
            if t in vocab:
                attr[vocab[t]] = A_USER_DEFINED
        for k in ("eos", "eot", "eom"):
            if special[k] is not None:
                eog.add(special[k])
        texts = {tokens[i]: i for i in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])
            attr[texts["<|end|>"]] = A_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attr[texts["</s>"]] = A_NORMAL
        self.eos_ids = eog

    def _build_spm(self, tokens: list[str], vocab: dict[str, int]) -> HFTokenizer:
        merges = _spm_merges(tokens, self._scores)
        unk = tokens[self.unk_id] if self.unk_id is not None else None
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk))
        norm = [normalizers.Replace(" ", SPACE)]
        if self.add_space_prefix:
            norm.insert(0, normalizers.Prepend(SPACE))
        tk.normalizer = normalizers.Sequence(norm)
        dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tk.decoder = decoders.Sequence(dec)
        return tk

    def _add_tokens(self, toks: list[str]) -> None:
        attr = self._attr
        special = np.nonzero(attr & (A_CONTROL | A_UNKNOWN))[0]
        user = np.nonzero(((attr & A_USER_DEFINED) != 0) & ((attr & (A_CONTROL | A_UNKNOWN)) == 0))[0]
        self.hf.add_special_tokens([AddedToken(toks[i], special=True, normalized=False) for i in special.tolist()])
        self.hf.add_tokens([AddedToken(toks[i], special=False, normalized=False) for i in user.tolist()])
        self.hf.encode_special_tokens = True
        if self.add_bos and self.bos_id is not None:  # for an exported tokenizer.json; encode adds BOS itself
            b = toks[self.bos_id]
            single, pair = f"{b}:0 $A:0", f"{b}:0 $A:0 {b}:1 $B:1"
            if self.add_eos and self.eos_id is not None:
                e = toks[self.eos_id]
                single, pair = f"{single} {e}:0", f"{b}:0 $A:0 {e}:0 {b}:1 $B:1 {e}:1"
                specials = [(b, self.bos_id), (e, self.eos_id)] if b != e else [(b, self.bos_id)]
            else:
                specials = [(b, self.bos_id)]
            try:
                self.hf.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                       special_tokens=specials)
            except Exception:  # a BOS text the template syntax cannot express (spaces, ':')
                pass

    @classmethod
    def from_hf_json(cls, tokenizer_json: str | os.PathLike, config: dict | None = None) -> "Tokenizer":
        """From an HF folder's tokenizer.json (its text as a str, or a Path to it), plus
        tokenizer_config.json values (bos_token, eos_token, add_bos_token, add_eos_token,
        add_prefix_space, chat_template) if given. The tokenizer is converted to GGUF
        metadata first, so it encodes exactly as llama.cpp will encode the converted file."""
        meta = _hf_json_to_meta(tokenizer_json, config or {})
        return cls.from_gguf_meta(meta, where="tokenizer.json")

    # ---- the inverse ----------------------------------------------------------------------------
    def gguf_meta(self) -> dict:
        """tokenizer.ggml.* (+ tokenizer.chat_template) keys for a GGUF file."""
        m = dict(self._src_meta)
        m["tokenizer.ggml.model"] = self.model
        m["tokenizer.ggml.pre"] = self.pre
        m["tokenizer.ggml.tokens"] = [self.token_text(i) for i in range(self.n_vocab)]
        m["tokenizer.ggml.token_type"] = np.asarray(self._types, np.int32)
        if self.model == "llama":
            m["tokenizer.ggml.scores"] = np.asarray(self._scores, np.float32)
            m["tokenizer.ggml.add_space_prefix"] = bool(self.add_space_prefix)
        else:
            m.pop("tokenizer.ggml.scores", None)
            m["tokenizer.ggml.merges"] = list(self._merges)
        for k, v in (("bos", self.bos_id), ("eos", self.eos_id), ("unknown", self.unk_id)):
            if v is not None:
                m[f"tokenizer.ggml.{k}_token_id"] = int(v)
        m["tokenizer.ggml.add_bos_token"] = bool(self.add_bos)
        m["tokenizer.ggml.add_eos_token"] = bool(self.add_eos)
        if self.chat_template:
            m["tokenizer.chat_template"] = self.chat_template
        return m

    # ---- text <-> ids ---------------------------------------------------------------------------
    @property
    def bos_text(self) -> str:
        return self.token_text(self.bos_id) if self.bos_id is not None else ""

    def token_text(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id) if self.hf is not None else self._texts[token_id]

    def drop_encoder(self) -> None:
        """Keep only what decoding needs: the token texts as one UTF-8 buffer (Gemma-3's
        262k: ~3 MiB) instead of the `tokenizers` model (~60 MiB), which is freed;
        encode() refuses from then on."""
        if self.hf is not None:
            self._texts = _Texts(self.hf.id_to_token(i) for i in range(self.n_vocab))
            self.hf = None

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of text. add_bos None: as llama.cpp's add_special (BOS if the model adds
        one, EOS if it adds one); True/False: BOS or not (no EOS). special=False: special
        tokens written in the text are plain text (llama-perplexity); True: they become their
        ids (llama.cpp's parse_special, for chat prompts)."""
        if not isinstance(text, str):
            raise EdgeRtError(f"encode: expected text, got {type(text).__name__}")
        if self.hf is None:
            raise EdgeRtError(f"{self.name}: the encoder was dropped after the prompt was read (a one-shot run); "
                              f"load the model with keep_encoder=True to encode again")
        with self._lock:  # encode_special_tokens is the HF tokenizer's state
            if special:
                self.hf.encode_special_tokens = False
            try:
                ids = [i for piece in _pieces(text) for i in self.hf.encode(piece, add_special_tokens=False).ids]
            except TypeError:  # a str holding lone surrogates is no UTF-8 text
                raise EdgeRtError("encode: the text is not valid Unicode (it holds lone surrogates)") from None
            finally:
                self.hf.encode_special_tokens = True
        bos = self.add_bos if add_bos is None else add_bos
        if bos:
            if self.bos_id is None:
                raise EdgeRtError(f"{self.name}: has no BOS token")
            ids.insert(0, self.bos_id)
        if add_bos is None and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _piece(self, tid: int, special: bool) -> bytes:
        """llama.cpp's token_to_piece: the bytes of one token."""
        if not 0 <= tid < self.n_vocab:
            raise EdgeRtError(f"token id {tid} is out of range (vocabulary of {self.n_vocab})")
        a = int(self._attr[tid])
        if a & (A_CONTROL | A_UNKNOWN):
            return self.token_text(tid).encode() if special else b""
        p = self._pieces.get(tid)
        if p is None:
            s = self.token_text(tid)
            if a & A_USER_DEFINED:
                p = s.encode()
            elif a & A_NORMAL:
                if self.model == "llama":
                    p = s.replace(SPACE, " ").encode()
                else:
                    try:
                        p = s.translate(_BYTE_DECODE_TABLE).encode("latin-1")
                    except UnicodeEncodeError:  # a character outside the byte map: keep it
                        p = b"".join(bytes([_BYTE_DECODE_TABLE[ord(c)]]) if ord(c) in _BYTE_DECODE_TABLE
                                     else c.encode() for c in s)
            elif a & A_BYTE and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                p = bytes([int(s[3:5], 16)])
            else:  # unused / undefined
                p = b""
            self._pieces[tid] = p
        return p

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The text of ids (control tokens are left out unless special). Bytes that are not
        valid UTF-8 become U+FFFD."""
        d = self.stream_decoder(special)
        return "".join([d.push(int(t)) for t in ids]) + d.flush()

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)

    # ---- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The model's own chat template (tokenizer.chat_template), rendered in a jinja2
        sandbox with limits on time, output and string sizes. Tokenize the result with
        encode(text, special=True)."""
        if not self.chat_template:
            raise EdgeRtError(f"{self.name}: the model has no chat template (tokenizer.chat_template)")
        if self._template_cache is None or self._template_cache[0] != self.chat_template:
            self._template_cache = (self.chat_template, _compile_template(self.chat_template))
        ctx = {"bos_token": self.bos_text,
               "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else "",
               **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
        return _render(self._template_cache[1], ctx)


class StreamDecoder:
    """Token by token decoding: push(id) returns only complete UTF-8 text, holding back
    the start of a multi-byte character until its last byte arrives; flush() the rest."""

    def __init__(self, tok: Tokenizer, special: bool = False):
        self._tok, self._special = tok, special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True

    def push(self, token_id: int) -> str:
        tok = self._tok
        p = tok._piece(int(token_id), self._special)
        if self._first:
            if tok.add_space_prefix:  # llama.cpp strips the space the tokenizer prepended
                if token_id == tok.bos_id and not self._special:
                    return ""
                if p.startswith(b" "):
                    p = p[1:]
            self._first = False
        return self._dec.decode(p)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# --- tokenizer.json -> GGUF metadata ------------------------------------------------------------
def _hf_pre_signature(pt: dict | None) -> list[str]:
    """The regexes (llama.cpp spelling) an HF pre_tokenizer applies before the byte mapping."""
    if pt is None:
        return []
    t = pt.get("type")
    if t == "Sequence":
        return [r for p in pt.get("pretokenizers", []) for r in _hf_pre_signature(p)]
    if t == "Digits":
        if not pt.get("individual_digits"):
            raise ValueError("Digits without individual_digits")
        return [N]
    if t == "ByteLevel":
        return [_RE_GPT2] if pt.get("use_regex", True) else []
    if t == "Split":
        pat = pt.get("pattern", {})
        if "Regex" not in pat or pt.get("behavior") != "Isolated" or pt.get("invert"):
            raise ValueError("unsupported Split")
        if pat["Regex"] in _KNOWN_REGEXES:  # written by this module
            return [pat["Regex"]]
        subst = {"(?i:'s|'t|'re|'ve|'m|'ll|'d)": _CONTRACTIONS, "[^\\r\\n\\p{L}\\p{N}]": NOT_RNLN,
                 "[^\\s\\p{L}\\p{N}]": NOT_SLN, "\\p{L}": L, "\\p{N}": N}
        return [re.sub("|".join(map(re.escape, subst)), lambda mt: subst[mt.group(0)], pat["Regex"])]
    raise ValueError(f"pre-tokenizer {t}")


def _find_pre(pt: dict | None) -> str:
    try:
        sig = _hf_pre_signature(pt)
    except ValueError as e:
        raise EdgeRtError(f"tokenizer.json: its pre-tokenizer has no llama.cpp equivalent here ({e})") from None
    for p, names in _PRE_GROUPS:
        if sig == p.regexes:
            return names[0] if p.name != "gpt2" else "gpt-2"
    raise EdgeRtError("tokenizer.json: its pre-tokenizer matches none of llama.cpp's known ones "
                      f"(supported: {', '.join(p.name for p, _ in _PRE_GROUPS)})")


def _walk(d: dict | None, key: str = "normalizers") -> list[dict]:
    if not d:
        return []
    if d.get("type") == "Sequence":
        return [x for s in d.get(key, d.get("pretokenizers", d.get("decoders", []))) for x in _walk(s, key)]
    return [d]


def _token_of(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _looks_special(s: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (s in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (s.startswith("<|") and s.endswith("|>"))
            or (s.startswith("<｜") and s.endswith("｜>")) or (s.startswith("<unused") and s.endswith(">")))


def _hf_json_to_meta(tokenizer_json: str | os.PathLike, config: dict) -> dict:
    text = tokenizer_json
    if isinstance(text, os.PathLike):  # only a Path is opened: a text that is not JSON is refused, never taken for a file name
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeRtError(f"{tokenizer_json}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        tj = json.loads(text)
    except ValueError as e:
        raise EdgeRtError(f"tokenizer.json: not JSON ({e})") from None
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise EdgeRtError("tokenizer.json: no model")
    m = tj["model"]
    if m.get("type", "BPE") != "BPE" or not isinstance(m.get("vocab"), dict):
        raise EdgeRtError(f"tokenizer.json: unsupported model {m.get('type')!r} (supported: BPE)")
    vocab: dict[str, int] = dict(m["vocab"])
    added = tj.get("added_tokens") or []
    for a in added:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
            raise EdgeRtError("tokenizer.json: malformed added_tokens entry")
        vocab.setdefault(a["content"], a["id"])
    n = max(vocab.values(), default=-1) + 1
    tokens: list[str | None] = [None] * n
    for s, i in vocab.items():
        if not isinstance(i, int) or i < 0 or tokens[i] is not None:
            raise EdgeRtError(f"tokenizer.json: token id {i} of {s!r} is negative or used twice")
        tokens[i] = s
    if any(t is None for t in tokens):
        missing = tokens.index(None)
        raise EdgeRtError(f"tokenizer.json: token ids are not contiguous (no token {missing})")
    types = np.full(n, T_NORMAL, np.int32)
    for a in added:  # as convert_hf_to_gguf.py: control if special or it looks so, else user-defined
        i, s = a["id"], a["content"]
        if a.get("special") or _looks_special(s):
            types[i] = T_CONTROL
        else:
            types[i] = T_USER_DEFINED
            tokens[i] = s.replace(SPACE, " ")  # "pre-normalize user-defined spaces"
    if len(set(tokens)) != n:
        raise EdgeRtError("tokenizer.json: two tokens have the same text")

    raw_merges = m.get("merges") or []
    if not isinstance(raw_merges, list):
        raise EdgeRtError("tokenizer.json: merges is not a list")
    try:  # ["a b", ...] (older files) or [["a", "b"], ...]
        pairs = [x.split(" ", 1) if isinstance(x, str) else x for x in raw_merges]
        merges = [a + " " + b for a, b in pairs]  # TypeError unless both are strings
    except (ValueError, TypeError):
        raise EdgeRtError("tokenizer.json: malformed merge") from None

    norms = [d.get("type") for d in _walk(tj.get("normalizer"))]
    pres = _walk(tj.get("pre_tokenizer"), "pretokenizers")
    spm = m.get("byte_fallback") or any(
        d.get("type") == "Replace" and d.get("content") == SPACE for d in _walk(tj.get("normalizer"))) or any(
        d.get("type") == "Metaspace" for d in pres)
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens}
    if spm:
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
        # llama.cpp merges by the score of the merged token: rank r of the first merge
        # making token t -> score -r (exact in float32 below 2^24 merges)
        first: dict[str, int] = {}
        for r, (a, b) in enumerate(pairs):
            first.setdefault(a + b, r)
        score = np.full(n, -float(len(merges) + 1), np.float64)
        got = [(vocab[t], -r) for t, r in first.items() if t in vocab]
        if got:
            ids, vals = zip(*got)
            score[list(ids)] = vals
        meta["tokenizer.ggml.scores"] = score.astype(np.float32)
        for i, s in enumerate(tokens):
            if types[i] == T_NORMAL and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                try:
                    int(s[3:5], 16)
                    types[i] = T_BYTE
                except ValueError:
                    pass
        prepend = "Prepend" in norms or any(
            d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" and
            d.get("add_prefix_space", True) for d in pres)
        meta["tokenizer.ggml.add_space_prefix"] = bool(config.get("add_prefix_space", prepend))
    else:
        if not any(d.get("type") == "ByteLevel" for d in pres) and not any(
                d.get("type") == "ByteLevel" for d in _walk(tj.get("decoder"), "decoders")):
            raise EdgeRtError("tokenizer.json: a BPE model that is neither byte-level nor SentencePiece-style")
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _find_pre(tj.get("pre_tokenizer"))
        meta["tokenizer.ggml.merges"] = merges
    meta["tokenizer.ggml.token_type"] = types

    # special tokens: tokenizer_config.json, else the post-processor's BOS, else by name
    post = tj.get("post_processor") or {}
    post_bos = None
    for p in _walk(post, "processors"):
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            if "SpecialToken" in first:
                post_bos = first["SpecialToken"].get("id")
    bos_t = _token_of(config.get("bos_token")) or post_bos
    eos_t = _token_of(config.get("eos_token"))
    if eos_t is None:
        eos_t = next((t for t in ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>") if t in vocab),
                     None)
    unk_t = _token_of(config.get("unk_token")) or m.get("unk_token")
    for key, t in (("bos", bos_t), ("eos", eos_t), ("unknown", unk_t), ("padding", _token_of(config.get("pad_token")))):
        if t is not None and t in vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = vocab[t]
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = post_bos is not None
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    if config.get("add_eos_token") is not None:
        meta["tokenizer.ggml.add_eos_token"] = bool(config["add_eos_token"])
    tmpl = config.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in tmpl if isinstance(d, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tmpl, str) and tmpl:
        meta["tokenizer.chat_template"] = tmpl
    return meta


# --- chat templates in a sandbox ------------------------------------------------------------------
_TEMPLATE_SECONDS = 2.0  # wall-clock budget for one rendering
_TEMPLATE_MAX_CHARS = 1 << 20  # output, and any string / list the template builds
_TEMPLATE_NAME = "<chat template>"
_BIG_PRINTF = re.compile(r"%[-#0 +]*(\*|\d{7,})|\.\d{7,}")  # a printf width of a million or more, or '*'
_BIG_FORMAT = re.compile(r"\d{7,}")  # the same in a str.format string


class _Stop(BaseException):
    """Raised inside the template's frames; BaseException so nothing on the way catches it."""


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_size(x, what: str = "a value"):
    if _size(x) > _TEMPLATE_MAX_CHARS:
        raise _Stop(f"{what} larger than {_TEMPLATE_MAX_CHARS} characters")
    return x


def _make_env():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    def precheck_call(obj, args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _TEMPLATE_MAX_CHARS:
                raise _Stop(f"an argument of {a} in a call")
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
        if isinstance(owner, str):
            if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                grow = owner.count(args[0]) * max(len(args[1]) - len(args[0]), 0) if args[0] else \
                    (len(owner) + 1) * len(args[1])
                if len(owner) + grow > _TEMPLATE_MAX_CHARS:
                    raise _Stop("a replace() result too large")
            if name in ("join",) and args and isinstance(args[0], (list, tuple)):
                total = sum(_size(x) for x in args[0]) + len(owner) * len(args[0])
                if total > _TEMPLATE_MAX_CHARS:
                    raise _Stop("a join() result too large")

    class ChatEnv(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if _size(seq) and isinstance(k, int) and _size(seq) * max(k, 0) > _TEMPLATE_MAX_CHARS:
                        raise _Stop("a repeated string or list too large")
            elif operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) \
                        and abs(left) > 1:
                    raise _Stop("a huge power")
            elif operator == "%" and isinstance(left, str) and _BIG_PRINTF.search(left):
                raise _Stop("a format string with a huge width")
            elif operator == "+" and _size(left) + _size(right) > _TEMPLATE_MAX_CHARS:
                raise _Stop("a concatenation too large")
            return _check_size(super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value):
            f = super().wrap_str_format(value)
            if f is not None and _BIG_FORMAT.search(value.__self__):
                def refuse(*args, **kwargs):
                    raise _Stop("a format string with a huge width")
                return refuse
            return f

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            precheck_call(__obj, args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    class LimitedNamespace(Namespace):
        def __setitem__(self, name, value):
            _check_size(value, "a namespace value")
            super().__setitem__(name, value)

    env = ChatEnv(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False)

    def guarded(f, name):
        @wraps(f)
        def g(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _TEMPLATE_MAX_CHARS:
                    raise _Stop(f"an argument of {a} to the {name} filter")
                if name == "format" and isinstance(a, str) and _BIG_PRINTF.search(a):
                    raise _Stop("a format string with a huge width")
            if name == "replace":
                strs = [a for a in args if isinstance(a, str)]
                if len(strs) >= 3:
                    s, old, new = strs[-3], strs[-2], strs[-1]
                    grow = s.count(old) * max(len(new) - len(old), 0) if old else (len(s) + 1) * len(new)
                    if len(s) + grow > _TEMPLATE_MAX_CHARS:
                        raise _Stop("a replace result too large")
            return _check_size(f(*args, **kwargs), f"the result of the {name} filter")
        return g

    for fname in list(env.filters):
        env.filters[fname] = guarded(env.filters[fname], fname)

    def raise_exception(message):
        from jinja2.exceptions import TemplateError
        raise TemplateError(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64:
            raise _Stop("a huge tojson indent")
        return _check_size(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                      sort_keys=sort_keys))

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(str(fmt))

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=LimitedNamespace)
    return env


_ENV = None


def _compile_template(source: str):
    global _ENV
    from jinja2.exceptions import TemplateError
    if _ENV is None:
        _ENV = _make_env()
    try:
        code = _ENV.compile(source, name=None, filename=_TEMPLATE_NAME)
        return _ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None), None)
    except TemplateError as e:
        raise EdgeRtError(f"the chat template is not valid jinja2 ({type(e).__name__}: {e})") from None
    except _Stop as e:  # jinja2 folds constant expressions (filters too) while compiling
        raise EdgeRtError(f"the chat template was stopped: {e}") from None
    except (RecursionError, MemoryError) as e:
        raise EdgeRtError(f"the chat template cannot be compiled ({type(e).__name__})") from None


def _render(template, ctx: dict) -> str:
    from jinja2.exceptions import SecurityError, TemplateError

    deadline = time.monotonic() + _TEMPLATE_SECONDS
    count = [0]

    def local(frame, event, arg):
        count[0] += 1
        if not count[0] & 1023 and time.monotonic() > deadline:
            raise _Stop(f"rendering took more than {_TEMPLATE_SECONDS:g} s")
        return local

    def on_call(frame, event, arg):
        if frame.f_code.co_filename != _TEMPLATE_NAME:
            return None
        for v in frame.f_locals.values():  # macro arguments
            _check_size(v, "a macro argument")
        return local

    old = sys.gettrace()
    out, total = [], 0
    sys.settrace(on_call)
    try:
        for chunk in template.generate(**ctx):
            total += len(chunk)
            if total > _TEMPLATE_MAX_CHARS:
                raise _Stop(f"output larger than {_TEMPLATE_MAX_CHARS} characters")
            out.append(chunk)
    except _Stop as e:
        raise EdgeRtError(f"the chat template was stopped: {e}") from None
    except SecurityError as e:
        raise EdgeRtError(f"the chat template was refused: {e}") from None
    except TemplateError as e:
        raise EdgeRtError(f"the chat template failed: {e}") from None
    except RecursionError:
        raise EdgeRtError("the chat template was stopped: recursion too deep") from None
    except (OverflowError, MemoryError) as e:  # jinja2's range() limit raises OverflowError
        raise EdgeRtError(f"the chat template was stopped: {e}") from None
    except Exception as e:  # any other error of the template's own making
        raise EdgeRtError(f"the chat template failed ({type(e).__name__}: {e})") from None
    finally:
        sys.settrace(old)
    return "".join(out)
