"""Better codes for the group formats (w = d*c + m per group, d and m float16).

- `fit_groups`: per group, a search over clipped ranges [s*lo, s*hi] followed by a
  weighted least-squares refit of (d, m) to the chosen codes (as llama.cpp's
  make_qkx2_quants), keeping whatever lowers sum_j h_j (w_j - d c_j - m)^2. h is the
  importance of each column (diag of the input Gram matrix when calibrated, else 1).
- `gptq`: GPTQ (Frantar et al. 2022): columns quantized one by one in order of
  decreasing input energy (act-order), each column's error spread over the columns not
  yet quantized through the inverse Hessian's Cholesky factor, in lazy blocks; every
  group's (d, m) comes from the weighted search above, fitted before any column moves,
  and is refitted to the final codes (`refit`).
- `refit`: per row, the (d, m) of all its groups at once, by least squares on the layer's
  output error for the codes given.

Both return integer codes c[rows, cols] and d, m [rows, groups] float16, as the format's
own `round` does; `fmt.encode` packs them into the file's parts, `fmt.decode` gives d*c + m."""
from __future__ import annotations

import numpy as np

from edge_rt import formats

SHRINK = np.linspace(1.0, 0.5, 11, dtype=np.float32)  # range fractions tried per group
DAMP = 0.01  # Hessian dampening, as a fraction of its mean diagonal
BLOCK_COLS = 128  # GPTQ's lazy-update block
SEARCH_ELEMS = 1 << 19  # weights per step of the clip search (~2 MB arrays: fastest here, 2x 8192-row steps)
REFIT_ROWS = 256  # rows per step of the refit
RIDGE = 1e-9  # the refit's pull towards the old (d, m), relative to its mean diagonal


def _err(w, c, d, m, h):
    """sum h (w - (d c + m))^2 over the last axis, in one working array"""
    t = d.astype(np.float32) * c
    t += m.astype(np.float32)
    np.square(np.subtract(w, t, out=t), out=t)
    t *= h
    return t.sum(axis=-1)


def fit_groups(wg: np.ndarray, h: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """wg[..., g] float32 groups, h[..., g] (broadcastable) importances >= 0 ->
    codes (float32 integers), d, m (float16 [...])."""
    qmax = (1 << bits) - 1
    wg = np.asarray(wg, np.float32)
    h = np.broadcast_to(np.asarray(h, np.float32), wg.shape)
    lo, hi = wg.min(axis=-1), wg.max(axis=-1)
    n, v = h.sum(-1), (h * wg).sum(-1)
    best = None
    for s in SHRINK:
        m = (lo * s).astype(np.float16)
        d = ((hi - lo) * s / qmax).astype(np.float16)
        c = formats.codes_for(wg, d[..., None], m[..., None], qmax)
        # weighted least squares for (d, m) given c: [sum h c^2, sum h c; sum h c, sum h] [d m]^T = [sum h c w, sum h w]
        hc = h * c
        a, b, u = (hc * c).sum(-1), hc.sum(-1), (hc * wg).sum(-1)
        det = a * n - b * b
        ok = det > 1e-12 * np.maximum(a * n, 1e-30)
        d2 = np.where(ok, (u * n - b * v) / np.where(ok, det, 1), d).astype(np.float16)
        m2 = np.where(ok, (a * v - b * u) / np.where(ok, det, 1), m).astype(np.float16)
        for dd, mm, cc in ((d, m, c), (d2, m2, None)):
            if cc is None:
                cc = formats.codes_for(wg, dd[..., None], mm[..., None], qmax)
            e = _err(wg, cc, dd[..., None], mm[..., None], h)
            if best is None:
                best = [e, cc, dd, mm]
                continue
            take = e < best[0]
            best[0] = np.where(take, e, best[0])
            np.copyto(best[1], cc, where=take[..., None])
            best[2] = np.where(take, dd, best[2])
            best[3] = np.where(take, mm, best[3])
    return best[1], best[2], best[3]


def _grouped(w: np.ndarray, g: int) -> np.ndarray:
    rows, cols = w.shape
    ng = -(-cols // g)
    return np.pad(w, ((0, 0), (0, ng * g - cols)), mode="edge").reshape(rows, ng, g), ng


def search(w: np.ndarray, fmt: formats.GroupQuant, importance: np.ndarray | None = None):
    """Round-to-nearest with the searched (d, m) of every group: codes, d, m. Rows go a
    few at a time (SEARCH_ELEMS weights), each group's search being independent."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    chunk = max(1, SEARCH_ELEMS // cols)
    ng = fmt.groups(cols)
    h = np.ones(cols, np.float32) if importance is None else np.asarray(importance, np.float32)
    hg = np.pad(h, (0, ng * fmt.group_size - cols)).reshape(1, ng, fmt.group_size)
    codes, d, m = np.empty((rows, cols), np.uint8), np.empty((rows, ng), np.float16), np.empty((rows, ng), np.float16)
    for r in range(0, rows, chunk):
        wg, _ = _grouped(w[r:r + chunk], fmt.group_size)
        c, d[r:r + chunk], m[r:r + chunk] = fit_groups(wg, hg, fmt.bits)
        codes[r:r + chunk] = c.reshape(len(wg), -1)[:, :cols]
    return codes, d, m


def gptq(w: np.ndarray, H: np.ndarray, fmt: formats.GroupQuant, damp: float = DAMP, block: int = BLOCK_COLS):
    """GPTQ with the format's groups: codes, d, m. H is the input Gram matrix [cols, cols].
    Columns go in order of decreasing diag(H) ("act-order": the columns whose error
    would cost most are quantized first, while most columns are left to absorb it);
    every group's (d, m) is fitted once, before, by the weighted clip search (a group's
    columns are scattered through that order), then refitted to the codes chosen."""
    W = np.array(w, dtype=np.float32)
    rows, cols = W.shape
    g, qmax = fmt.group_size, (1 << fmt.bits) - 1
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    hdiag = np.diag(H).astype(np.float32)
    _, d_all, m_all = search(W, fmt, hdiag)
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    order = np.argsort(-hdiag, kind="stable")
    # upper Cholesky factor of H^-1 (columns in order): row i holds how column i's error moves columns i..
    U = np.linalg.cholesky(np.linalg.inv(H[order][:, order])).T.astype(np.float32)
    W = W[:, order]
    codes = np.zeros((rows, cols), np.uint8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((rows, i2 - i1), np.float32), U[i1:i2, i1:i2]
        group = order[i1:i2] // g  # the block's columns' groups, so (d, m) per column never exist for the whole matrix
        D1, M1 = d_all[:, group].astype(np.float32), m_all[:, group].astype(np.float32)
        for i in range(i2 - i1):
            d, m = D1[:, i], M1[:, i]
            c = formats.codes_for(W1[:, i], d, m, qmax)
            codes[:, order[i1 + i]] = c
            err = (W1[:, i] - (d * c + m)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    H[dead, :] = H[:, dead] = 0.0  # columns that never see an input do not count, nor do their weights
    d_all, m_all = refit(w, H, codes, g, d_all, m_all)
    return codes, d_all, m_all


def refit(w: np.ndarray, H: np.ndarray, codes: np.ndarray, g: int, d: np.ndarray, m: np.ndarray,
          chunk: int = REFIT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the float16 (d, m) of all its groups that minimize the output error
    e H e^T, e = w - (d c + m) per group, for the codes c given. In the unknowns
    theta = (d_1..d_G, m_1..m_G) that error is theta^T A theta - 2 theta^T b + w H w^T with
        A = [[C^T H C, C^T H 1], [1^T H C, 1^T H 1]],  b = [C^T H w^T, 1^T H w^T],
    C (cols x G) holding each group's codes in its columns and 1 the group indicator: the
    groups couple through H, so each row is one (2G x 2G) least-squares problem. A row
    keeps the old (d, m) where the new ones, rounded, do not lower the error."""
    rows, cols = w.shape
    ng = d.shape[1]
    cp = ng * g
    Hp = np.zeros((cp, cp), np.float32)  # padded to whole groups; the padding never counts
    Hp[:cols, :cols] = H
    Hg = Hp.reshape(ng, g, ng, g)
    S = Hg.sum(axis=3)  # S[a, i, b] = sum over group b's columns j of H[(a, i), (b, j)]
    Hb = [np.ascontiguousarray(Hg[:, :, b, :].reshape(cp, g).T) for b in range(ng)]
    d_out, m_out = d.copy(), m.copy()
    for r in range(0, rows, chunk):
        n = min(chunk, rows - r)
        wr, c = np.zeros((n, cp), np.float32), np.zeros((n, cp), np.float32)
        wr[:, :cols], c[:, :cols] = w[r:r + n], codes[r:r + n]
        c = c.reshape(n, ng, g)
        HC = np.stack([c[:, b] @ Hb[b] for b in range(ng)], axis=-1).reshape(n, ng, g, ng)  # (H C) per row
        Hw = (wr @ Hp).reshape(n, ng, g)
        A = np.empty((n, 2 * ng, 2 * ng))
        A[:, :ng, :ng] = np.einsum("rai,raib->rab", c, HC)
        A[:, :ng, ng:] = np.einsum("rai,aib->rab", c, S)
        A[:, ng:, :ng] = A[:, :ng, ng:].transpose(0, 2, 1)
        A[:, ng:, ng:] = S.sum(axis=1)
        b = np.concatenate([np.einsum("rai,rai->ra", c, Hw), Hw.sum(-1)], axis=1).astype(np.float64)
        old = np.concatenate([d[r:r + n], m[r:r + n]], axis=1).astype(np.float64)
        lam = RIDGE * np.maximum(np.einsum("rii->r", A) / (2 * ng), np.finfo(np.float32).tiny)[:, None]
        diag = np.arange(2 * ng)
        Ar = A.copy()
        Ar[:, diag, diag] += lam  # pins the directions the codes leave free (a constant group, a dead one)
        with np.errstate(over="ignore", invalid="ignore"):
            new = np.linalg.solve(Ar, (b + lam * old)[..., None])[..., 0].astype(np.float16).astype(np.float64)

        def error(t):  # e H e^T less its constant w H w^T
            return np.einsum("ri,rij,rj->r", t, A, t) - 2 * np.einsum("ri,ri->r", t, b)

        take = np.isfinite(new).all(axis=1)
        take[take] = error(new[take]) < error(old[take])
        d_out[r:r + n][take], m_out[r:r + n][take] = new[take, :ng], new[take, ng:]
    return d_out, m_out
