"""Calibrated quantization, mixed precision and pruning (converters/): the codes they
choose are the formats' own, and they do what they claim on real weights."""
from __future__ import annotations

import numpy as np
import pytest

from edge_rt import formats
from edge_rt.converters import calibrate, gptq
from edge_rt.converters.readers import open_source

RNG = np.random.default_rng(5)


def definition(w, fmt):
    """The group formats' definition, written out: per group m = min, d = (max - min) /
    (2^bits - 1) in float16, c = clip(rint((w - m) / d)), w' = d*c + m."""
    rows, cols = w.shape
    out = np.empty_like(w)
    for r in range(rows):
        for j in range(0, cols, fmt.group_size):
            x = w[r, j:j + fmt.group_size]
            m = np.float16(x.min())
            d = np.float16((x.max() - x.min()) / np.float32((1 << fmt.bits) - 1))
            c = np.clip(np.rint((x - np.float32(m)) / np.float32(d)) if d else 0 * x, 0, (1 << fmt.bits) - 1)
            out[r, j:j + fmt.group_size] = np.float32(d) * c + np.float32(m)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_matches_definition(bits, group):
    fmt = formats.GroupQuant(bits, group)
    w = RNG.standard_normal((8, 256)).astype(np.float32)
    w[0, :group] = 0.25  # a constant group: d = 0
    assert np.array_equal(fmt.dequantize(fmt.quantize(w), 256), definition(w, fmt))
    # codes and (d, m) from the searches become parts whose dequantization is d*c + m exactly
    H = w.T @ w + np.eye(256, dtype=np.float32)
    for c, d, m in (gptq.search(w, fmt), gptq.gptq(w, H, fmt)):
        assert c.dtype == np.uint8 and c.max() <= (1 << bits) - 1 and d.dtype == m.dtype == np.float16
        assert np.array_equal(fmt.dequantize(fmt.encode(c, d, m), 256), fmt.decode(c, d, m))


@pytest.fixture(scope="module")
def smollm2_stats(smollm2_gguf):
    """SmolLM2 run on one short window of the validation text, every matrix's input Gram matrix kept."""
    src = open_source(smollm2_gguf)
    return src, calibrate.collect(src, windows=2, ctx=128, progress=False)


def output_error(w, wq, H):
    D = (w - wq).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", D, H, D))


@pytest.mark.parametrize("name, bits", [("blk.3.ffn_down.weight", 3), ("blk.20.attn_v.weight", 3),
                                        ("blk.20.attn_v.weight", 4)])
def test_gptq_beats_round_to_nearest(smollm2_stats, name, bits):
    """On real weights and real activations, GPTQ's layer output error sum ||(W - Q) x||^2
    is well under round-to-nearest's (group size 128, which SmolLM2's Q4_1 source does not align to)."""
    src, stats = smollm2_stats
    assert stats.count[name] == 2 * 128
    w, H = stats.matrix(name), stats.gram[name]
    fmt = formats.GroupQuant(bits, 128)
    rtn = output_error(w, fmt.dequantize(fmt.quantize(w), w.shape[1]), H)
    ours = output_error(w, fmt.decode(*gptq.gptq(w, H, fmt)), H)
    assert ours < 0.5 * rtn, (ours, rtn)


@pytest.mark.parametrize("name", ["blk.3.ffn_down.weight", "blk.20.attn_v.weight"])
def test_refit_lowers_output_error(smollm2_stats, name):
    """Refitting each row's (d, m) to fixed codes by least squares on the output error
    (H coupling the groups) never raises a row's error and cuts the matrix's well down,
    from the clip search's codes, whose (d, m) were fitted group by group on diag(H)."""
    src, stats = smollm2_stats
    w, H = stats.matrix(name), stats.gram[name]
    fmt = formats.GroupQuant(3, 32)
    c, d, m = gptq.search(w, fmt, np.diag(H))
    d2, m2 = gptq.refit(w, H, c, 32, d, m)

    def per_row(d, m):
        e = (w - fmt.decode(c, d, m)).astype(np.float64)
        return np.einsum("ij,jk,ik->i", e, H, e)
    before, after = per_row(d, m), per_row(d2, m2)
    assert d2.dtype == m2.dtype == np.float16 and np.isfinite(d2).all() and np.isfinite(m2).all()
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.8 * before.sum(), (after.sum(), before.sum())


@pytest.fixture(scope="module")
def tiny_src32(tmp_path_factory, smollm2_gguf):
    """A float32 tiny llama of two layers (random weights, SmolLM2's vocabulary): a fast
    convert source. Its tokenizer metadata alone is 2.3 MB, so its smallest file has 4.4
    bits per weight; its 49,152-row head is 96% of its weights."""
    from edge_rt.converters.quantize import choose_formats
    from edge_rt.converters.writers import edge_rt_items, write_gguf
    from tiny import tiny_source
    src = tiny_source("llama", smollm2_gguf, layers=2)
    out = tmp_path_factory.mktemp("quality") / "src32.gguf"
    items, extra = edge_rt_items(src, choose_formats(src.shapes, 32, 64))
    write_gguf(out, src, items, extra, progress=False)
    return out


def matrix_types(path):
    from edge_rt.inspect import inspect
    return {t["name"]: t["type"] for t in inspect(path)["tensors"] if len(t["shape"]) == 2}


@pytest.mark.parametrize("bits, size, method", [(4.6, None, "gptq"), (5.5, None, "rtn"), (None, 5_000_000, "clip")])
def test_mixed_precision_stays_within_budget(tiny_src32, tmp_path, bits, size, method):
    from edge_rt.api import load
    from edge_rt.converters.convert import convert
    out = convert(tiny_src32, tmp_path / "mixed.gguf", bits=bits or 4, size=size, method=method,
                  calib_windows=1, progress=False)
    src = open_source(tiny_src32)
    params = sum(int(np.prod(s)) for s in src.shapes.values())
    budget = size if size is not None else bits * params / 8
    used = out.stat().st_size
    assert used <= budget
    assert used > 0.9 * budget  # the budget is spent, not just respected
    types = set(matrix_types(out).values())
    assert len(types) >= 2, types  # a real mix of widths
    m = load(out, ctx=64)
    z = m.logits(m.tokenizer.encode("The quick brown fox"))
    assert np.isfinite(z).all()


def test_mixed_precision_keeps_the_head_at_embed_bits(tiny_src32, tmp_path):
    """--size with --embed-bits: the embeddings/head keep that width and the budget goes to the
    other matrices (left to the chooser, this 8.66 MB budget gives the head 8 bits)."""
    from edge_rt.converters.convert import convert
    size = 8_660_000
    for embed_bits in (8, 3):
        out = convert(tiny_src32, tmp_path / f"mixed{embed_bits}.gguf", size=size, embed_bits=embed_bits,
                      method="rtn", calib_windows=1, progress=False)
        assert out.stat().st_size <= size
        types = matrix_types(out)
        heads = {n: t for n, t in types.items() if n in ("token_embd.weight", "output.weight")}
        others = {t for n, t in types.items() if n not in heads}
        assert heads and set(heads.values()) == {f"q{embed_bits}:64"}, (embed_bits, heads)
        if embed_bits == 8:
            assert out.stat().st_size > 0.97 * size and len(others) >= 2, others  # spent, on a mix
        else:
            assert others == {"q8:128"}, others  # every other matrix as wide as it goes (8 bits: groups of 128)


def test_width_allocation_is_the_best_within_the_spare_bytes():
    """mixed.allocate against every combination of widths on small random problems, and on the
    case a greedy walk gets wrong: a big matrix whose widening to 8 bits buys the most error of
    all but costs nearly the whole spare, the small ones each buying more per byte."""
    import itertools
    from edge_rt.converters.mixed import WIDTHS, allocate
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 4
        nw = len(WIDTHS)
        errors = [dict(zip(WIDTHS, np.sort(rng.random(nw))[::-1] * rng.random() * 10)) for _ in range(n)]
        costs = [dict(zip(WIDTHS, np.r_[0, np.sort(rng.integers(1, 300, nw - 1))])) for _ in range(n)]
        spare = int(rng.integers(0, 700))
        best = min((sum(e[b] for e, b in zip(errors, c)), c) for c in itertools.product(WIDTHS, repeat=n)
                   if sum(k[b] for k, b in zip(costs, c)) <= spare)
        got = allocate(errors, costs, spare)
        assert sum(k[b] for k, b in zip(costs, got)) <= spare
        assert sum(e[b] for e, b in zip(errors, got)) == pytest.approx(best[0], rel=1e-12)
    head = {2: 100.0, 3: 60.0, 4: 40.0, 5: 39.0, 6: 38.0, 8: 0.0}, {2: 0, 3: 21, 4: 42, 5: 63, 6: 84, 8: 126}
    small = {2: 10.0, 3: 5.0, 4: 3.0, 5: 2.0, 6: 1.0, 8: 0.0}, {2: 0, 3: 2, 4: 4, 5: 6, 6: 8, 8: 10}
    got = allocate([head[0]] + [small[0]] * 4, [head[1]] + [small[1]] * 4, 130)
    assert got[0] == 8, got  # greedily: the small ones to 8 bits first (40 bytes), then the head to 4 only


def test_budget_below_the_smallest_file_is_refused(tiny_src32, tmp_path):
    from edge_rt.converters.convert import convert
    from edge_rt.errors import EdgeRtError
    with pytest.raises(EdgeRtError, match="smallest file"):
        convert(tiny_src32, tmp_path / "x.gguf", size=1_000_000, method="rtn", progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("prune", ["ffn:0.25", "2:4", "wanda:0.5"])
def test_pruned_model_loads_and_runs(tiny_src32, tmp_path, prune):
    from edge_rt.api import load
    from edge_rt.converters.convert import convert
    from edge_rt.gguf_file import GGUFFile
    from tiny import FF
    out = convert(tiny_src32, tmp_path / "pruned.gguf", bits=4, method="rtn", prune=prune, calib_windows=1,
                  progress=False)
    g = GGUFFile(out)
    d_ff = g.meta["llama.feed_forward_length"]
    assert d_ff == (FF * 3 // 4 // 32 * 32 if prune.startswith("ffn") else FF)
    assert g.meta["edgert.prune"] == prune
    m = load(out, ctx=64)
    assert m.spec.d_ff == d_ff
    z = m.logits(m.tokenizer.encode("The quick brown fox"))
    assert np.isfinite(z).all()
    if prune.startswith("ffn"):
        full = convert(tiny_src32, tmp_path / "full.gguf", bits=4, method="rtn", progress=False)
        assert out.stat().st_size < full.stat().st_size


def test_two_of_four_keeps_two_in_every_four(smollm2_stats):
    from edge_rt.converters import prune
    src, stats = smollm2_stats
    name = "blk.7.ffn_up.weight"
    w = prune._unstructured(stats.matrix(name), stats.gram[name], "nm", (2, 4))
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(axis=2) <= 2).all()
    w = prune._unstructured(stats.matrix(name), stats.gram[name], "wanda", 0.5)
    assert ((w == 0).sum(axis=1) >= w.shape[1] // 2).all()


@pytest.mark.parametrize("kwargs, message", [({"bits": 1.5}, "average width"), ({"bits": 3.5, "target": "llama.cpp"},
                                             "only --format edge-rt"), ({"prune": "half"}, "expected wanda"),
                                            ({"prune": "3:5"}, "N:M"), ({"method": "smoothquant"}, "not offered")])
def test_bad_quality_options_are_refused(tiny_src32, tmp_path, kwargs, message):
    from edge_rt.converters.convert import convert
    from edge_rt.errors import EdgeRtError
    with pytest.raises(EdgeRtError, match=message):
        convert(tiny_src32, tmp_path / "x.gguf", progress=False, **kwargs)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("layer, part, bound", [(20, "attn", 0.7), (20, "ffn", 0.85), (3, "ffn_down", 0.98)])
def test_awq_beats_round_to_nearest(smollm2_stats, layer, part, bound):
    """AWQ's scales lower the summed output error of a group of matrices sharing one input,
    on real weights and activations (3 bits, groups of 128, which SmolLM2's source does not
    align to). Measured: attention ~0.5x, FFN gate/up ~0.74x, ffn_down ~0.75-0.95x."""
    from edge_rt.converters import awq
    src, stats = smollm2_stats
    fold, kind, mats = next(g for g in awq.groups(src.shapes) if g[2][0].startswith(f"blk.{layer}.{part}"))
    fmt, H = formats.GroupQuant(3, 128), stats.gram[mats[0]]
    ws = [stats.matrix(m) for m in mats]
    s, alpha, tried = awq.search(ws, [fmt] * len(ws), H, stats.count[mats[0]])
    rtn = sum(output_error(w, awq.rtn(fmt, w), H) for w in ws)
    ours = sum(output_error(w, awq.rtn(fmt, w * s) / s, H) for w in ws)
    assert tried[0][0] == 0 and np.isclose(tried[0][1], rtn, rtol=1e-4)  # alpha 0 is round-to-nearest
    assert alpha > 0 and ours < bound * rtn, (alpha, ours, rtn)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_awq_scaling_folds_exactly(smollm2_gguf, arch):
    """The scaled source (norm weights and ffn_up rows divided by s, matrices' columns
    multiplied by s) runs the same function as the original, Gemma-3's post-norms included."""
    from edge_rt.converters import awq
    from edge_rt.converters.quantize import choose_formats
    from edge_rt.models import spec_from_meta
    from edge_rt.models.transformer import KVCache, forward
    from tiny import tiny_source
    src = tiny_source(arch, smollm2_gguf)
    stats = calibrate.collect(src, windows=1, ctx=32, progress=False)
    scaled, gram, alphas = awq.apply(src, choose_formats(src.shapes, 2, 32), stats.gram, stats.count, progress=False)
    assert len(alphas) == len(awq.groups(src.shapes)) and any(a > 0 for a in alphas.values())
    spec = spec_from_meta(src.meta, len(src.meta["tokenizer.ggml.tokens"]), src.path)
    tokens = np.arange(1, 40) * 7
    h0 = forward(spec, calibrate.RecordingWeights(src), tokens, 0, KVCache(spec, 64, "f32"))
    h1 = forward(spec, calibrate.RecordingWeights(scaled), tokens, 0, KVCache(spec, 64, "f32"))
    assert not np.array_equal(scaled.load("blk.0.attn_q.weight"), src.load("blk.0.attn_q.weight"))
    np.testing.assert_allclose(h1, h0, rtol=2e-3, atol=2e-3)


def test_auto_keeps_one_of_its_candidates(tiny_src32, tmp_path, capsys):
    """--method auto converts with each candidate, keeps the file of the lowest held-out
    validation perplexity under the asked name, and leaves no candidate behind."""
    from edge_rt.api import load
    from edge_rt.converters.convert import convert
    from edge_rt.converters.quantize import AUTO
    from edge_rt.gguf_file import GGUFFile
    out = convert(tiny_src32, tmp_path / "auto.gguf", bits=3, method="auto", calib_windows=1, progress=False)
    said = capsys.readouterr().err
    kept = GGUFFile(out).meta["edgert.method"]
    assert kept in AUTO and f"kept {kept}" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.gguf"]
    assert np.isfinite(load(out, ctx=64).logits([1, 2, 3])).all()


def test_end_to_end_cost_equals_a_whole_forward_with_the_matrix_swapped(smollm2_gguf):
    """sensitivity.Window.kl re-runs only layers L.. from the float run's kept inputs (and the
    whole model for the tied embeddings/head): the same KL as a fresh forward of the whole
    model with that one matrix swapped, on SmolLM2."""
    from edge_rt.converters import sensitivity
    from edge_rt.models import spec_from_meta
    src = open_source(smollm2_gguf)
    spec = spec_from_meta(src.meta, len(src.meta["tokenizer.ggml.tokens"]), src.path)
    W = sensitivity.SwappedWeights(src)
    tokens = calibrate.calibration_windows(src, windows=1, ctx=32)[0]
    run = sensitivity.Window(spec, W, tokens, scored=8)
    fmt = formats.GroupQuant(2, 64)
    for name in ("blk.29.ffn_down.weight", "blk.3.attn_k.weight", "token_embd.weight"):
        w = W.matrix(name)
        W.swap = {name: fmt.dequantize(fmt.quantize(w), w.shape[1])}
        fresh = sensitivity.Window(spec, W, tokens, scored=8)  # every layer and the head with the swap
        want = np.mean(np.sum(np.exp(run.logp) * (run.logp - fresh.logp), axis=-1))
        assert run.kl(name) == pytest.approx(want, rel=1e-4), name
        assert want > 0
        W.swap = {}


def test_mix_chooser_never_worse_than_uniform_4_bits_by_its_measure(smollm2_gguf):
    """On SmolLM2's last two layers (14 matrices, costs measured end to end with the clip
    quantizer, widths offered at group sizes 64 and 128): every 2/3/4-bit cost is positive and
    narrower is costlier; at a budget of uniform 4 bits' bytes (groups of 64) plus 2% the chosen
    options fit it and cost no more than uniform 4 bits at either group size."""
    from edge_rt.converters import mixed, sensitivity
    from edge_rt.converters.quantize import quantizer
    src = open_source(smollm2_gguf)
    names = [n for n in src.shapes if n.startswith(("blk.28.", "blk.29.")) and len(src.shapes[n]) == 2]
    opts = mixed.options(mixed.group_sizes(64))
    assert opts[0] == (2, 128) and opts[-1] == (8, 128) and (4, 64) in opts
    costs = sensitivity.measure(src, names, opts[:-1], quantizer("clip"), windows=1, ctx=64, scored=16,
                                progress=False)
    for n, c in costs.items():
        for g in (64, 128):
            assert 0 < c[4, g] < c[3, g] < c[2, g], (n, c)
    costs = {n: c | {opts[-1]: 0.0} for n, c in costs.items()}
    sizes = {n: {o: mixed.matrix_bytes(src.shapes[n], *o) for o in opts} for n in names}
    narrowest = {n: sizes[n][opts[0]] for n in names}
    uniform = sum(sizes[n][4, 64] - narrowest[n] for n in names)
    for spare in (int(uniform * 1.02), uniform, int(uniform * 0.7)):
        pick = mixed.fit(costs, sizes, spare)
        assert sum(sizes[n][pick[n]] - narrowest[n] for n in names) <= spare
        if spare >= uniform * 1.02:
            for g in (64, 128):
                assert sum(costs[n][pick[n]] for n in names) <= sum(costs[n][4, g] for n in names)
            assert len(set(pick.values())) >= 2, pick  # a real mix, not uniform 4 bits
