"""CPU kernels (Numba) on the canonical ``(A, B, C, D)`` form: one fused forward, one backward.

Sets are ``(a, c)``; a set's elements are ``(b, d)``. Work is cut into *tasks* — an
``a`` and a range of ``b`` — grouped into one chunk per thread. When each task holds
whole sets ("fused"), a thread computes a set's statistics and normalizes it while it
is still in cache: one read from memory, one write. Otherwise (batch norm, few large
sets) tasks produce partial statistics that are merged before the normalizing pass.

Statistics are stable: each cache-sized block is reduced in two passes (block mean,
then squared deviations from it, with the first-order correction), and blocks are
merged with Chan's formula, all in float64. The ``fastmath`` flags only allow
reassociation and contraction (vectorized sums, fused multiply-add); NaN and
infinity still propagate.

Affine parameters come as a flat array and four offset tables (see ``canonical``);
``mode`` says how the innermost run indexes them: 0 one value, 1 consecutive, 2 gather.

This module imports numba; import it only through the dispatcher, which falls back
to the reference path when numba is missing.
"""

# ruff: noqa: ANN001, ANN201, ANN202  (Numba infers kernel types from the call)
from __future__ import annotations

import os

import numpy as np
from numba import njit

FASTMATH = {"reassoc", "contract"}
ROWS = 64  # rows summed in the input's dtype before a float64 flush (column families)
COLS = 256  # column block of a wide slab (with all its rows) normalized while cached
BLOCK = 8192  # elements reduced per two-pass block: 32-64 KiB, stays in L1/L2
COLUMN_BLOCK = 32768  # the same for columns (D = 1): 128 KiB, in L2, at most 2·ROWS rows
GROUP = 32768  # bfloat16: elements widened into float32 scratch at a time (128 KiB, in L2)

# Which part of a fused pass to run. Statistics derived between the passes (the hybrid
# norms) split a forward into STATS then OUTPUT (given mean, rstd per set), a backward
# into SUMS (Σ w·gy and Σ w·gy·x̂ per set) then INPUT (given k1, k2 per set).
FULL, STATS, OUTPUT = 0, 1, 2
SUMS, INPUT = 1, 2
# Elements of extra work for the calling thread's chunk: waking a pool thread took ~30 µs
# (2 cores), ~17 µs of the caller's work; one 50K-element task more for the caller cut a
# 1.6M-element LayerNorm2d call from 0.32 to 0.28 ms, two tasks gave 0.30
HEAD_START = 49152


@njit(cache=True, fastmath=FASTMATH)
def _block_shape(C, D):
    """Rows, columns and inner length of one two-pass block (about BLOCK elements).

    Blocks span many rows when runs are short, so the per-block merge stays rare
    (with blocks of 41 rows of 196 columns the merges took a third of the time).
    """
    if D >= BLOCK:
        return 1, 1, BLOCK
    if D > 1:
        cb = max(1, min(C, BLOCK // D))
        return max(1, BLOCK // (cb * D)), cb, D
    cb = min(C, 256)
    return max(16, min(2 * ROWS, COLUMN_BLOCK // cb)), cb, 1


# Inner loops run over 1-D slices indexed from 0: that lets LLVM drop the negative-index
# checks and vectorize (4-D indexing ran ~4x slower).


@njit(cache=True, fastmath=FASTMATH)
def _column_sums(xa, C, b0, b1, c0, c1, sv):
    """sv += Σ over rows b0:b1 of x[b, c0:c1] (D = 1), four rows per step.

    Adding four rows before touching sv cuts its loads and stores fourfold: with one
    row per step the loop was bound by them, not by the data.
    """
    w = c1 - c0
    b = b0
    while b + 4 <= b1:
        r0 = xa[b * C + c0 : b * C + c1]
        r1 = xa[(b + 1) * C + c0 : (b + 1) * C + c1]
        r2 = xa[(b + 2) * C + c0 : (b + 2) * C + c1]
        r3 = xa[(b + 3) * C + c0 : (b + 3) * C + c1]
        for i in range(w):
            sv[i] += (r0[i] + r1[i]) + (r2[i] + r3[i])
        b += 4
    while b < b1:
        r0 = xa[b * C + c0 : b * C + c1]
        for i in range(w):
            sv[i] += r0[i]
        b += 1


@njit(cache=True, fastmath=FASTMATH)
def _column_deviations(xa, C, b0, b1, c0, c1, sv, qv, ev):
    """ev += Σ (x − sv), qv += Σ (x − sv)² over rows b0:b1 of x[b, c0:c1] (D = 1), four rows per step."""
    w = c1 - c0
    b = b0
    while b + 4 <= b1:
        r0 = xa[b * C + c0 : b * C + c1]
        r1 = xa[(b + 1) * C + c0 : (b + 1) * C + c1]
        r2 = xa[(b + 2) * C + c0 : (b + 2) * C + c1]
        r3 = xa[(b + 3) * C + c0 : (b + 3) * C + c1]
        for i in range(w):
            m = sv[i]
            v0 = r0[i] - m
            v1 = r1[i] - m
            v2 = r2[i] - m
            v3 = r3[i] - m
            ev[i] += (v0 + v1) + (v2 + v3)
            qv[i] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
        b += 4
    while b < b1:
        r0 = xa[b * C + c0 : b * C + c1]
        for i in range(w):
            v = r0[i] - sv[i]
            ev[i] += v
            qv[i] += v * v
        b += 1


@njit(cache=True, fastmath=FASTMATH)
def _stats(xa, B, C, D, b_lo, b_hi, c_lo, c_hi, center, mean, m2, count, s, q, e):
    """Mean, sum of squared deviations and count per c in c_lo:c_hi over rows b_lo:b_hi.

    `xa` is one a's slab, flat (B·C·D); s, q, e are scratch of size C.
    """
    bb, cb, db = _block_shape(c_hi - c_lo, D)
    for c in range(c_lo, c_hi):
        mean[c] = 0.0
        m2[c] = 0.0
        count[c] = 0.0
    for b0 in range(b_lo, b_hi, bb):
        b1 = min(b0 + bb, b_hi)
        for c0 in range(c_lo, c_hi, cb):
            c1 = min(c0 + cb, c_hi)
            for d0 in range(0, D, db):
                d1 = min(d0 + db, D)
                n = float((b1 - b0) * (d1 - d0))
                sv = s[c0:c1]
                qv = q[c0:c1]
                ev = e[c0:c1]
                sv[:] = 0.0
                qv[:] = 0.0
                ev[:] = 0.0
                if D == 1:
                    if center:  # pass 1: the block's mean
                        _column_sums(xa, C, b0, b1, c0, c1, sv)
                        for i in range(sv.shape[0]):
                            sv[i] /= n
                    # pass 2 (the block is in cache): deviations from the block mean
                    _column_deviations(xa, C, b0, b1, c0, c1, sv, qv, ev)
                else:
                    if center:  # pass 1: the block's mean
                        for b in range(b0, b1):
                            for c in range(c0, c1):
                                start = (b * C + c) * D
                                seg = xa[start + d0 : start + d1]
                                t = xa.dtype.type(0)
                                for i in range(seg.shape[0]):
                                    t += seg[i]
                                s[c] += t
                        for i in range(sv.shape[0]):
                            sv[i] /= n
                    # pass 2 (the block is in cache): deviations from the block mean
                    for b in range(b0, b1):
                        for c in range(c0, c1):
                            start = (b * C + c) * D
                            seg = xa[start + d0 : start + d1]
                            m = s[c]
                            tq = xa.dtype.type(0)
                            te = xa.dtype.type(0)
                            for i in range(seg.shape[0]):
                                v = seg[i] - m
                                te += v
                                tq += v * v
                            q[c] += tq
                            e[c] += te
                # merge the block (Chan). Every column of a block has seen the same
                # count, so the factors are scalars: no division per column (with
                # short blocks of many columns the divisions cost as much as the data)
                before = count[c0]
                tot = before + n
                inv_n = 1.0 / n
                f1 = n / tot
                f2 = before * n / tot
                for c in range(c0, c1):
                    if center:
                        # in float64: e² in float32 overflows on huge input (|x| ~ 1e30),
                        # and inf − inf would make the variance NaN instead of inf
                        ec = np.float64(e[c])
                        mb = s[c] + ec * inv_n
                        qb = max(np.float64(q[c]) - ec * ec * inv_n, 0.0)
                        delta = mb - mean[c]
                        mean[c] += delta * f1
                        m2[c] += qb + delta * delta * f2
                    else:  # RMS: sum of squares around 0, no cancellation to fear
                        m2[c] += q[c]
                    count[c] = tot


@njit(cache=True, fastmath=FASTMATH)
def _normalize(xa, ya, B, C, D, b_lo, b_hi, c_lo, c_hi, ma, ra, w, bias, oa_, ob, oc, od, mode, sc, sh):  # fmt: skip
    """y = (x − mean)·rstd·w + bias over rows b_lo:b_hi, columns c_lo:c_hi of one a.

    ma, ra: that a's statistics per column; `oa_` its offset; sc, sh: scratch of size C.
    """
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(c_lo, c_hi):
                m = xa.dtype.type(ma[c])
                r = xa.dtype.type(ra[c])
                base = oa_ + ob[b] + oc[c]
                start = (b * C + c) * D
                xs = xa[start : start + D]
                ys = ya[start : start + D]
                if mode == 0:
                    scale = xa.dtype.type(ra[c] * w[base])
                    shift = xa.dtype.type(bias[base] - ma[c] * ra[c] * w[base])
                    for i in range(D):
                        ys[i] = xs[i] * scale + shift
                elif mode == 1:
                    ws = w[base : base + D]
                    bs = bias[base : base + D]
                    for i in range(D):
                        ys[i] = (xs[i] - m) * r * ws[i] + bs[i]
                else:
                    for i in range(D):
                        o = base + od[i]
                        ys[i] = (xs[i] - m) * r * w[o] + bias[o]
        return
    if _rows_share_affine(
        ob, b_lo, b_hi
    ):  # one scale and shift per c for every row: precompute them
        base = oa_ + ob[b_lo] + od[0]
        for c in range(c_lo, c_hi):
            o = base if mode == 0 else base + oc[c]
            sc[c] = ra[c] * w[o]
            sh[c] = bias[o] - ma[c] * sc[c]
        scv = sc[c_lo:c_hi]
        shv = sh[c_lo:c_hi]
        for b in range(b_lo, b_hi):
            xs = xa[b * C + c_lo : b * C + c_hi]
            ys = ya[b * C + c_lo : b * C + c_hi]
            for i in range(xs.shape[0]):
                ys[i] = xs[i] * scv[i] + shv[i]
        return
    mav = ma[c_lo:c_hi]
    rav = ra[c_lo:c_hi]
    for b in range(b_lo, b_hi):
        base = oa_ + ob[b] + od[0]
        xs = xa[b * C + c_lo : b * C + c_hi]
        ys = ya[b * C + c_lo : b * C + c_hi]
        if mode == 0:
            wv = w[base]
            bv = bias[base]
            for i in range(xs.shape[0]):
                ys[i] = (xs[i] - mav[i]) * rav[i] * wv + bv
        else:
            for i in range(xs.shape[0]):
                o = base + oc[c_lo + i]
                ys[i] = (xs[i] - mav[i]) * rav[i] * w[o] + bias[o]


@njit(nogil=True, cache=True)
def _rstd(var, eps):
    """1/√(var + eps) as torch.rsqrt gives it: +inf for a zero sum, never a division by zero.

    Statistics-only passes run with eps = 0 (the caller adds its own eps to statistics it
    derives), so a set of equal values (a black image, a dead channel) has var + eps = 0.
    """
    t = var + eps
    if t == 0.0:
        return np.inf
    return 1.0 / np.sqrt(t)


@njit(cache=True, fastmath=FASTMATH)
def _fold(pm, pq, pn, gs, a, mean, var, rstd, eps, mcol, rcol, s_lo, s_hi):
    """Chan-merge groups of `gs` adjacent columns into one set each (sets s_lo:s_hi);
    write the set's mean, var, rstd at row a and spread mean and rstd over the columns."""
    for c in range(s_lo, s_hi):
        m = 0.0
        q = 0.0
        n = 0.0
        for j in range(c * gs, c * gs + gs):
            if pn[j] > 0:
                tot = n + pn[j]
                delta = pm[j] - m
                m += delta * pn[j] / tot
                q += pq[j] + delta * delta * n * pn[j] / tot
                n = tot
        v = q / n if n > 0 else np.nan  # an empty set has no moments (torch: NaN)
        r = _rstd(v, eps)
        mean[a, c] = m if n > 0 else np.nan
        var[a, c] = v
        rstd[a, c] = r
        for j in range(c * gs, c * gs + gs):
            mcol[j] = m
            rcol[j] = r


@njit(cache=True)
def _short_rows(B, C, D, mode):
    """Each set one contiguous row of at most BLOCK elements, with an affine rows handle."""
    return C == 1 and B * D <= BLOCK and (B == 1 or (mode == 0 and D > 1))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _forward_rows(x, y, B, D, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, part, t0, t1):  # fmt: skip
    """One set per row of x (A, B·D), short: two passes over the row, then the output.

    With B > 1 the affine is one value per run of D (mode 0: group norm's channels).
    Written with 2-D indexing and no helper calls: per-row views and calls cost more
    than the row's arithmetic when rows are a few hundred elements long.
    """
    n = x.shape[1]
    zero = x.dtype.type(0)
    for i in range(t0, t1):
        a = tasks[i, 0]
        if part == OUTPUT:  # given statistics
            mu = mean[a, 0]
            r = rstd[a, 0]
        else:
            m = zero
            if center:
                total = zero
                for j in range(n):
                    total += x[a, j]
                m = x.dtype.type(total / n)
            q = zero
            e = zero
            for j in range(n):
                v = x[a, j] - m
                e += v
                q += v * v
            mu = np.float64(m) + np.float64(e) / n if center else 0.0
            var_ = max(np.float64(q) - np.float64(e) * e / n, 0.0) / n if center else q / n
            r = _rstd(var_, eps)
            mean[a, 0] = mu
            var[a, 0] = var_
            rstd[a, 0] = r
            if part == STATS:
                continue
        if mode == 0:
            for b in range(B):
                base = oa[a] + ob[b] + oc[0]
                scale = x.dtype.type(r * w[base])
                shift = x.dtype.type(bias[base] - mu * r * w[base])
                xs = x[a, b * D : b * D + D]  # views indexed from 0: they vectorize
                ys = y[a, b * D : b * D + D]
                for j in range(D):
                    ys[j] = xs[j] * scale + shift
            continue
        base = oa[a] + ob[0] + oc[0]
        m32 = x.dtype.type(mu)
        r32 = x.dtype.type(r)
        if mode == 1:
            ws = w[base : base + n]  # a view: indexing w[base + j] would not vectorize
            bs = bias[base : base + n]
            for j in range(n):
                y[a, j] = (x[a, j] - m32) * r32 * ws[j] + bs[j]
        else:
            for j in range(n):
                o = base + od[j]
                y[a, j] = (x[a, j] - m32) * r32 * w[o] + bias[o]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _forward_fused(x, y, shape, gs, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, part, t0, t1):  # fmt: skip
    """Tasks t0:t1, each whole sets: statistics, then the output while the slab is in cache.

    `part` STATS stops after the statistics; OUTPUT takes them from mean and rstd.
    """
    _, B, C, D = shape
    if _short_rows(B, C, D, mode):  # many short sets (LayerNorm, small maps): no blocking
        _forward_rows(x, y, B, D, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, part, t0, t1)  # fmt: skip
        return
    pm = np.empty(C)
    pq = np.empty(C)
    pn = np.empty(C)
    s = np.empty(C, x.dtype)
    q = np.empty(C, x.dtype)
    e = np.empty(C, x.dtype)
    mcol = np.empty(C, x.dtype)
    rcol = np.empty(C, x.dtype)
    for i in range(t0, t1):
        a = tasks[i, 0]
        # a slab with many columns goes by column blocks: statistics over all rows of a
        # block, then its output, while the block (rows x COLS) is still in cache
        step = C if D > 1 or C <= 2 * COLS else max(gs, COLS // gs * gs)
        for c_lo in range(0, C, step):
            c_hi = min(c_lo + step, C)
            if part == OUTPUT:
                for c in range(c_lo, c_hi):
                    mcol[c] = mean[a, c // gs]
                    rcol[c] = rstd[a, c // gs]
            else:
                _stats(x[a], B, C, D, 0, B, c_lo, c_hi, center, pm, pq, pn, s, q, e)
                _fold(pm, pq, pn, gs, a, mean, var, rstd, eps, mcol, rcol, c_lo // gs, c_hi // gs)
                if part == STATS:
                    continue
            _normalize(x[a], y[a], B, C, D, 0, B, c_lo, c_hi, mcol, rcol, w, bias, oa[a], ob, oc, od, mode, s, q)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _partial_stats(x, shape, center, tasks, pmean, pm2, pcount, t0, t1):
    """Per task t0:t1 (a slice of rows of one a): mean, M2 and count per column."""
    _, B, C, D = shape
    s = np.empty(C, x.dtype)
    q = np.empty(C, x.dtype)
    e = np.empty(C, x.dtype)
    for i in range(t0, t1):
        a = tasks[i, 0]
        _stats(x[a], B, C, D, tasks[i, 1], tasks[i, 2], 0, C, center, pmean[i], pm2[i], pcount[i], s, q, e)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _merge_stats(tasks, pmean, pm2, pcount, gs, mean, var, rstd, eps, mcol, rcol):
    """Chan-merge the partial statistics task by task, then per set (gs columns)."""
    A, C = mcol.shape
    cm = np.zeros((A, C))
    cq = np.zeros((A, C))
    cn = np.zeros((A, C))
    for i in range(tasks.shape[0]):
        a = tasks[i, 0]
        for c in range(C):
            n = pcount[i, c]
            if n > 0:
                t2 = cn[a, c] + n
                delta = pmean[i, c] - cm[a, c]
                cm[a, c] += delta * n / t2
                cq[a, c] += pm2[i, c] + delta * delta * cn[a, c] * n / t2
                cn[a, c] = t2
    for a in range(A):
        _fold(cm[a], cq[a], cn[a], gs, a, mean, var, rstd, eps, mcol[a], rcol[a], 0, mean.shape[1])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _apply_tasks(x, y, shape, mean, rstd, w, bias, oa, ob, oc, od, mode, tasks, t0, t1):
    """y for tasks t0:t1 with per-column statistics mean, rstd (A, C).

    Last task first: after a statistics pass over the same tasks, the most recently
    read data is still in cache.
    """
    _, B, C, D = shape
    sc = np.empty(C, x.dtype)
    sh = np.empty(C, x.dtype)
    for i in range(t1 - 1, t0 - 1, -1):
        a = tasks[i, 0]
        _normalize(
            x[a], y[a], B, C, D, tasks[i, 1], tasks[i, 2], 0, C, mean[a], rstd[a],
            w, bias, oa[a], ob, oc, od, mode, sc, sh,
        )  # fmt: skip


@njit(cache=True, fastmath=FASTMATH)
def _rows_share_affine(ob, b_lo, b_hi):
    for b in range(b_lo, b_hi):
        if ob[b] != ob[b_lo]:
            return False
    return True


@njit(cache=True, fastmath=FASTMATH)
def _grad_sums(xa, ga, B, C, D, b_lo, b_hi, ma, ra, w, oa_, ob, oc, od, mode, sg, sgx, dw, db):
    """Per c: Σ gy·w and Σ gy·w·x̂ over rows b_lo:b_hi; Σ gy·x̂ and Σ gy into dw, db."""
    for c in range(C):
        sg[c] = 0.0
        sgx[c] = 0.0
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(C):
                m = xa.dtype.type(ma[c])
                r = xa.dtype.type(ra[c])
                base = oa_ + ob[b] + oc[c]
                start = (b * C + c) * D
                xs = xa[start : start + D]
                gys = ga[start : start + D]
                tg = xa.dtype.type(0)
                tgx = xa.dtype.type(0)
                if mode == 0:
                    for i in range(D):
                        g = gys[i]
                        tg += g
                        tgx += g * (xs[i] - m)
                    tgx *= r
                    sg[c] += tg * w[base]
                    sgx[c] += tgx * w[base]
                    dw[base] += tgx
                    db[base] += tg
                elif mode == 1:
                    ws = w[base : base + D]
                    dws = dw[base : base + D]
                    dbs = db[base : base + D]
                    for i in range(D):
                        g = gys[i]
                        xh = (xs[i] - m) * r
                        tg += g * ws[i]
                        tgx += g * ws[i] * xh
                        dws[i] += g * xh
                        dbs[i] += g
                    sg[c] += tg
                    sgx[c] += tgx
                else:
                    for i in range(D):
                        o = base + od[i]
                        g = gys[i]
                        xh = (xs[i] - m) * r
                        tg += g * w[o]
                        tgx += g * w[o] * xh
                        dw[o] += g * xh
                        db[o] += g
                    sg[c] += tg
                    sgx[c] += tgx
        return
    if _rows_share_affine(ob, b_lo, b_hi):
        # one affine value per column for all rows: accumulate Σg and Σg·x̂ per column in
        # the input's dtype for ROWS rows at a time, then fold in the affine (float64)
        base = oa_ + ob[b_lo] + od[0]
        acc1 = np.zeros(C, xa.dtype)
        acc2 = np.zeros(C, xa.dtype)
        for r0 in range(b_lo, b_hi, ROWS):
            r1 = min(r0 + ROWS, b_hi)
            b = r0
            while b + 4 <= r1:  # four rows per step: acc1, acc2, ma, ra touched once
                x0 = xa[b * C : b * C + C]
                x1 = xa[(b + 1) * C : (b + 1) * C + C]
                x2 = xa[(b + 2) * C : (b + 2) * C + C]
                x3 = xa[(b + 3) * C : (b + 3) * C + C]
                g0 = ga[b * C : b * C + C]
                g1 = ga[(b + 1) * C : (b + 1) * C + C]
                g2 = ga[(b + 2) * C : (b + 2) * C + C]
                g3 = ga[(b + 3) * C : (b + 3) * C + C]
                for i in range(C):
                    m = ma[i]
                    h0, h1, h2, h3 = g0[i], g1[i], g2[i], g3[i]
                    acc1[i] += (h0 + h1) + (h2 + h3)
                    gx_ = (h0 * (x0[i] - m) + h1 * (x1[i] - m)) + (
                        h2 * (x2[i] - m) + h3 * (x3[i] - m)
                    )
                    acc2[i] += gx_ * ra[i]
                b += 4
            while b < r1:
                xs = xa[b * C : b * C + C]
                gys = ga[b * C : b * C + C]
                for i in range(C):
                    g = gys[i]
                    acc1[i] += g
                    acc2[i] += g * ((xs[i] - ma[i]) * ra[i])
                b += 1
            for i in range(C):
                o = base if mode == 0 else (base + i if mode == 1 else base + oc[i])
                sg[i] += w[o] * acc1[i]
                sgx[i] += w[o] * acc2[i]
                dw[o] += acc2[i]
                db[o] += acc1[i]
                acc1[i] = 0
                acc2[i] = 0
        return
    for b in range(b_lo, b_hi):  # the affine changes from row to row (LayerNorm2d, NCHW)
        base = oa_ + ob[b] + od[0]
        xs = xa[b * C : b * C + C]
        gys = ga[b * C : b * C + C]
        if mode == 0:
            tdw = 0.0
            tdb = 0.0
            wv = w[base]
            for i in range(C):
                g = gys[i]
                xh = (xs[i] - ma[i]) * ra[i]
                sg[i] += g * wv
                sgx[i] += g * wv * xh
                tdw += g * xh
                tdb += g
            dw[base] += tdw
            db[base] += tdb
        else:
            for i in range(C):
                o = base + oc[i]
                g = gys[i]
                xh = (xs[i] - ma[i]) * ra[i]
                sg[i] += g * w[o]
                sgx[i] += g * w[o] * xh
                dw[o] += g * xh
                db[o] += g


@njit(cache=True, fastmath=FASTMATH)
def _grad_input(xa, ga, gxa, B, C, D, b_lo, b_hi, ma, ra, k1, k2, w, oa_, ob, oc, od, mode):
    """gx = rstd·(gy·w − k1 − x̂·k2) over rows b_lo:b_hi (k1, k2 per c)."""
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(C):
                m = xa.dtype.type(ma[c])
                r = xa.dtype.type(ra[c])
                u = xa.dtype.type(k1[c])
                v = xa.dtype.type(k2[c])
                base = oa_ + ob[b] + oc[c]
                start = (b * C + c) * D
                xs = xa[start : start + D]
                gys = ga[start : start + D]
                out = gxa[start : start + D]
                if mode == 0:
                    alpha = xa.dtype.type(ra[c] * w[base])
                    beta = xa.dtype.type(-ra[c] * ra[c] * k2[c])
                    gamma = xa.dtype.type(-ra[c] * k1[c] + ma[c] * ra[c] * ra[c] * k2[c])
                    for i in range(D):
                        out[i] = gys[i] * alpha + xs[i] * beta + gamma
                elif mode == 1:
                    ws = w[base : base + D]
                    for i in range(D):
                        out[i] = r * (gys[i] * ws[i] - u - (xs[i] - m) * r * v)
                else:
                    for i in range(D):
                        out[i] = r * (gys[i] * w[base + od[i]] - u - (xs[i] - m) * r * v)
        return
    if _rows_share_affine(ob, b_lo, b_hi):  # gx = gy·α + x·β + γ with α, β, γ per column
        base = oa_ + ob[b_lo] + od[0]
        alpha = np.empty(C, xa.dtype)
        beta = np.empty(C, xa.dtype)
        gamma = np.empty(C, xa.dtype)
        for i in range(C):
            o = base if mode == 0 else (base + i if mode == 1 else base + oc[i])
            r = np.float64(ra[i])
            alpha[i] = r * w[o]
            beta[i] = -r * r * k2[i]
            gamma[i] = -r * k1[i] + ma[i] * r * r * k2[i]
        for b in range(b_lo, b_hi):
            xs = xa[b * C : b * C + C]
            gys = ga[b * C : b * C + C]
            out = gxa[b * C : b * C + C]
            for i in range(C):
                out[i] = gys[i] * alpha[i] + xs[i] * beta[i] + gamma[i]
        return
    for b in range(b_lo, b_hi):
        base = oa_ + ob[b] + od[0]
        xs = xa[b * C : b * C + C]
        gys = ga[b * C : b * C + C]
        out = gxa[b * C : b * C + C]
        if mode == 0:
            wv = xa.dtype.type(w[base])
            for i in range(C):
                r = ra[i]
                out[i] = r * (gys[i] * wv - k1[i] - (xs[i] - ma[i]) * r * k2[i])
        else:
            for i in range(C):
                o = base + oc[i]
                r = ra[i]
                out[i] = r * (gys[i] * w[o] - k1[i] - (xs[i] - ma[i]) * r * k2[i])


@njit(cache=True, fastmath=FASTMATH)
def _fold_sums(sg, sgx, gs, n, center, k1, k2):
    """Per set (gs adjacent columns): k1 = mean(g), k2 = mean(g·x̂), spread over columns."""
    for c0 in range(0, sg.shape[0], gs):
        u = 0.0
        v = 0.0
        for j in range(c0, c0 + gs):
            u += sg[j]
            v += sgx[j]
        for j in range(c0, c0 + gs):
            k1[j] = u / n if center else 0.0
            k2[j] = v / n


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _backward_rows(x, gy, gx, B, D, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, part, s1, s2, dw, db, t0, t1):  # fmt: skip
    """Backward for one set per short row (the forward's `_forward_rows`).

    `part` SUMS stores Σ w·gy, Σ w·gy·x̂ into s1, s2 (no gx); INPUT takes k1, k2 from them.
    """
    n = x.shape[1]
    zero = x.dtype.type(0)
    # one affine row for all rows (LayerNorm): take its views once, not per row
    shared = t1 > t0 and mode == 1
    for i in range(t0, t1):
        if oa[tasks[i, 0]] != oa[tasks[t0, 0]]:
            shared = False
    base0 = oa[tasks[t0, 0]] + ob[0] + oc[0] if shared else 0
    ws0 = w[base0 : base0 + n] if shared else w[:0]
    dws0 = dw[base0 : base0 + n] if shared else dw[:0]
    dbs0 = db[base0 : base0 + n] if shared else db[:0]
    for i in range(t0, t1):
        a = tasks[i, 0]
        mu = mean[a, 0]
        rs = rstd[a, 0]
        m = x.dtype.type(mu)
        r = x.dtype.type(rs)
        if mode == 0:
            if part == INPUT:
                k1 = s1[a, 0]
                k2 = s2[a, 0]
            else:
                sg = 0.0
                sgx = 0.0
                for b in range(B):
                    base = oa[a] + ob[b] + oc[0]
                    tg = zero
                    tgx = zero
                    xs = x[a, b * D : b * D + D]  # views indexed from 0: they vectorize
                    gs_ = gy[a, b * D : b * D + D]
                    for j in range(D):
                        g = gs_[j]
                        tg += g
                        tgx += g * (xs[j] - m)
                    tgx *= r
                    wv = np.float64(w[base])
                    dw[base] += tgx
                    db[base] += tg
                    sg += wv * tg
                    sgx += wv * tgx
                if part == SUMS:
                    s1[a, 0] = sg
                    s2[a, 0] = sgx
                    continue
                k1 = sg / n if batch and center else 0.0
                k2 = sgx / n if batch else 0.0
            for b in range(B):
                base = oa[a] + ob[b] + oc[0]
                wv = np.float64(w[base])
                alpha = x.dtype.type(rs * wv)
                beta = x.dtype.type(-rs * rs * k2)
                gamma = x.dtype.type(-rs * k1 + mu * rs * rs * k2)
                xs = x[a, b * D : b * D + D]
                gs_ = gy[a, b * D : b * D + D]
                out = gx[a, b * D : b * D + D]
                for j in range(D):
                    out[j] = gs_[j] * alpha + xs[j] * beta + gamma
            continue
        base = oa[a] + ob[0] + oc[0]
        if part == INPUT:
            u = x.dtype.type(s1[a, 0])
            v = x.dtype.type(s2[a, 0])
        else:
            sg = zero
            sgx = zero
            if mode == 1:
                ws = ws0 if shared else w[base : base + n]
                dws = dws0 if shared else dw[base : base + n]
                dbs = dbs0 if shared else db[base : base + n]
                for j in range(n):
                    g = gy[a, j]
                    xh = (x[a, j] - m) * r
                    gw = g * ws[j]
                    sg += gw
                    sgx += gw * xh
                    dws[j] += g * xh
                    dbs[j] += g
            else:
                for j in range(n):
                    o = base + od[j]
                    g = gy[a, j]
                    xh = (x[a, j] - m) * r
                    gw = g * w[o]
                    sg += gw
                    sgx += gw * xh
                    dw[o] += g * xh
                    db[o] += g
            if part == SUMS:
                s1[a, 0] = sg
                s2[a, 0] = sgx
                continue
            u = x.dtype.type(sg / n if batch and center else 0.0)
            v = x.dtype.type(sgx / n if batch else 0.0)
        if mode == 1:
            ws = ws0 if shared else w[base : base + n]
            for j in range(n):
                gx[a, j] = r * (gy[a, j] * ws[j] - u - (x[a, j] - m) * r * v)
        else:
            for j in range(n):
                gx[a, j] = r * (gy[a, j] * w[base + od[j]] - u - (x[a, j] - m) * r * v)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _backward_fused(x, gy, gx, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, part, s1, s2, dw, db, t0, t1):  # fmt: skip
    """Tasks t0:t1, each whole sets: the sums, then gx while the slab is in cache.

    `part` SUMS stores the per-set sums into s1, s2 (A, C // gs); INPUT takes k1, k2 there.
    """
    _, B, C, D = shape
    if _short_rows(B, C, D, mode):
        _backward_rows(x, gy, gx, B, D, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, part, s1, s2, dw, db, t0, t1)  # fmt: skip
        return
    n = float(B * D * gs)
    sg = np.empty(C)
    sgx = np.empty(C)
    k1 = np.zeros(C, x.dtype)
    k2 = np.zeros(C, x.dtype)
    for i in range(t0, t1):
        a = tasks[i, 0]
        if part == INPUT:
            for c in range(C):
                k1[c] = s1[a, c // gs]
                k2[c] = s2[a, c // gs]
        else:
            _grad_sums(x[a], gy[a], B, C, D, 0, B, mean[a], rstd[a], w, oa[a], ob, oc, od, mode, sg, sgx, dw, db)  # fmt: skip
            if part == SUMS:
                for c in range(C):
                    if c % gs == 0:
                        s1[a, c // gs] = 0.0
                        s2[a, c // gs] = 0.0
                    s1[a, c // gs] += sg[c]
                    s2[a, c // gs] += sgx[c]
                continue
            if batch:
                _fold_sums(sg, sgx, gs, n, center, k1, k2)
        _grad_input(x[a], gy[a], gx[a], B, C, D, 0, B, mean[a], rstd[a], k1, k2, w, oa[a], ob, oc, od, mode)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _partial_grad_sums(x, gy, shape, mean, rstd, w, oa, ob, oc, od, mode, tasks, psg, psgx, dw, db, t0, t1):  # fmt: skip
    _, B, C, D = shape
    for i in range(t0, t1):
        a = tasks[i, 0]
        _grad_sums(
            x[a], gy[a], B, C, D, tasks[i, 1], tasks[i, 2], mean[a], rstd[a], w,
            oa[a], ob, oc, od, mode, psg[i], psgx[i], dw, db,
        )  # fmt: skip


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _merge_grad_sums(tasks, psg, psgx, gs, n, center, k1, k2):
    A, C = k1.shape
    tg = np.zeros((A, C))
    tgx = np.zeros((A, C))
    for i in range(tasks.shape[0]):
        a = tasks[i, 0]
        for c in range(C):
            tg[a, c] += psg[i, c]
            tgx[a, c] += psgx[i, c]
    for a in range(A):
        _fold_sums(tg[a], tgx[a], gs, n, center, k1[a], k2[a])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _grad_input_tasks(x, gy, gx, shape, mean, rstd, k1, k2, w, oa, ob, oc, od, mode, tasks, t0, t1):  # fmt: skip
    _, B, C, D = shape
    for i in range(t1 - 1, t0 - 1, -1):  # last task first, as in _apply_tasks
        a = tasks[i, 0]
        _grad_input(
            x[a], gy[a], gx[a], B, C, D, tasks[i, 1], tasks[i, 2], mean[a], rstd[a],
            k1[a], k2[a], w, oa[a], ob, oc, od, mode,
        )  # fmt: skip


# bfloat16: numba has no such type, so a bf16 tensor arrives as uint16 bits. Each task's
# slab is widened into a float32 scratch (exact: bf16 is the top half of a float32),
# the float32 routines run on it in cache, and the output is rounded back to nearest
# even. Statistics stay float32 or wider; no full-size float32 copy is made.


@njit(nogil=True, cache=True)
def _widen(src, dst):
    for i in range(src.shape[0]):
        dst[i] = np.uint32(src[i]) << 16


@njit(nogil=True, cache=True)
def _narrow(src, dst):
    for i in range(src.shape[0]):
        b = np.int64(src[i])
        if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN stays NaN (quiet)
            dst[i] = (b >> 16) | 0x40
        else:
            dst[i] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(nogil=True, cache=True)
def _groups(tasks, t0, t1, L):
    """Runs of consecutive a (whole-set tasks) of about GROUP elements: (first task, count)."""
    per = max(1, GROUP // L)
    out = np.empty((t1 - t0, 2), np.int64)
    n = 0
    i = t0
    while i < t1:
        j = i + 1
        while j < t1 and j - i < per and tasks[j, 0] == tasks[j - 1, 0] + 1:
            j += 1
        out[n, 0] = i
        out[n, 1] = j - i
        n += 1
        i = j
    return out[:n]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _forward_fused_bf16(x, y, shape, gs, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, part, t0, t1):  # fmt: skip
    B = shape[1]
    L = x.shape[1]
    groups = _groups(tasks, t0, t1, L)
    most = max(1, GROUP // L)
    xb = np.empty((most, L), np.uint32)
    yb = np.empty((most, L), np.uint32)
    xf = xb.view(np.float32)
    yf = yb.view(np.float32)
    local = np.zeros((most, 3), np.int64)
    for k in range(most):
        local[k, 0] = k
        local[k, 2] = B
    for g in range(groups.shape[0]):
        a = tasks[groups[g, 0], 0]
        n = groups[g, 1]
        for k in range(n):
            _widen(x[a + k], xb[k])
        _forward_fused(xf, yf, shape, gs, mean[a : a + n], var[a : a + n], rstd[a : a + n], w, bias, oa[a : a + n], ob, oc, od, mode, eps, center, local, part, 0, n)  # fmt: skip
        if part != STATS:
            for k in range(n):
                _narrow(yb[k], y[a + k])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _partial_stats_bf16(x, shape, center, tasks, pmean, pm2, pcount, t0, t1):
    _, B, C, D = shape
    row = C * D
    most = 0
    for i in range(t0, t1):
        most = max(most, tasks[i, 2] - tasks[i, 1])
    xb = np.empty(most * row, np.uint32)
    xf = xb.view(np.float32)
    s = np.empty(C, np.float32)
    q = np.empty(C, np.float32)
    e = np.empty(C, np.float32)
    for i in range(t0, t1):
        a, lo, hi = tasks[i, 0], tasks[i, 1], tasks[i, 2]
        n = (hi - lo) * row
        _widen(x[a, lo * row : hi * row], xb[:n])
        _stats(
            xf[:n], hi - lo, C, D, 0, hi - lo, 0, C, center, pmean[i], pm2[i], pcount[i], s, q, e
        )


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _apply_tasks_bf16(x, y, shape, mean, rstd, w, bias, oa, ob, oc, od, mode, tasks, t0, t1):
    _, B, C, D = shape
    row = C * D
    most = 0
    for i in range(t0, t1):
        most = max(most, tasks[i, 2] - tasks[i, 1])
    xb = np.empty(most * row, np.uint32)
    yb = np.empty(most * row, np.uint32)
    xf = xb.view(np.float32)
    yf = yb.view(np.float32)
    sc = np.empty(C, np.float32)
    sh = np.empty(C, np.float32)
    for i in range(t1 - 1, t0 - 1, -1):
        a, lo, hi = tasks[i, 0], tasks[i, 1], tasks[i, 2]
        n = (hi - lo) * row
        _widen(x[a, lo * row : hi * row], xb[:n])
        _normalize(xf[:n], yf[:n], hi - lo, C, D, 0, hi - lo, 0, C, mean[a], rstd[a], w, bias, oa[a], ob[lo:hi], oc, od, mode, sc, sh)  # fmt: skip
        _narrow(yb[:n], y[a, lo * row : hi * row])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _backward_fused_bf16(x, gy, gx, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, part, s1, s2, dw, db, t0, t1):  # fmt: skip
    B = shape[1]
    L = x.shape[1]
    groups = _groups(tasks, t0, t1, L)
    most = max(1, GROUP // L)
    xb = np.empty((most, L), np.uint32)
    gb = np.empty((most, L), np.uint32)
    ob_ = np.empty((most, L), np.uint32)
    xf = xb.view(np.float32)
    gf = gb.view(np.float32)
    of = ob_.view(np.float32)
    local = np.zeros((most, 3), np.int64)
    for k in range(most):
        local[k, 0] = k
        local[k, 2] = B
    for g in range(groups.shape[0]):
        a = tasks[groups[g, 0], 0]
        n = groups[g, 1]
        for k in range(n):
            _widen(x[a + k], xb[k])
            _widen(gy[a + k], gb[k])
        _backward_fused(xf, gf, of, shape, gs, mean[a : a + n], rstd[a : a + n], w, oa[a : a + n], ob, oc, od, mode, batch, center, local, part, s1[a : a + n], s2[a : a + n], dw, db, 0, n)  # fmt: skip
        if part != SUMS:
            for k in range(n):
                _narrow(ob_[k], gx[a + k])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _partial_grad_sums_bf16(x, gy, shape, mean, rstd, w, oa, ob, oc, od, mode, tasks, psg, psgx, dw, db, t0, t1):  # fmt: skip
    _, B, C, D = shape
    row = C * D
    most = 0
    for i in range(t0, t1):
        most = max(most, tasks[i, 2] - tasks[i, 1])
    xb = np.empty(most * row, np.uint32)
    gb = np.empty(most * row, np.uint32)
    xf = xb.view(np.float32)
    gf = gb.view(np.float32)
    for i in range(t0, t1):
        a, lo, hi = tasks[i, 0], tasks[i, 1], tasks[i, 2]
        n = (hi - lo) * row
        _widen(x[a, lo * row : hi * row], xb[:n])
        _widen(gy[a, lo * row : hi * row], gb[:n])
        _grad_sums(xf[:n], gf[:n], hi - lo, C, D, 0, hi - lo, mean[a], rstd[a], w, oa[a], ob[lo:hi], oc, od, mode, psg[i], psgx[i], dw, db)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _grad_input_tasks_bf16(x, gy, gx, shape, mean, rstd, k1, k2, w, oa, ob, oc, od, mode, tasks, t0, t1):  # fmt: skip
    _, B, C, D = shape
    row = C * D
    most = 0
    for i in range(t0, t1):
        most = max(most, tasks[i, 2] - tasks[i, 1])
    xb = np.empty(most * row, np.uint32)
    gb = np.empty(most * row, np.uint32)
    ob_ = np.empty(most * row, np.uint32)
    xf = xb.view(np.float32)
    gf = gb.view(np.float32)
    of = ob_.view(np.float32)
    for i in range(t1 - 1, t0 - 1, -1):
        a, lo, hi = tasks[i, 0], tasks[i, 1], tasks[i, 2]
        n = (hi - lo) * row
        _widen(x[a, lo * row : hi * row], xb[:n])
        _widen(gy[a, lo * row : hi * row], gb[:n])
        _grad_input(xf[:n], gf[:n], of[:n], hi - lo, C, D, 0, hi - lo, mean[a], rstd[a], k1[a], k2[a], w, oa[a], ob[lo:hi], oc, od, mode)  # fmt: skip
        _narrow(ob_[:n], gx[a, lo * row : hi * row])


# Entry points. The kernels release the GIL; chunks run on a small thread pool (one
# chunk on the calling thread), so no OpenMP runtime competes with torch's for cores.

_pool: list = [None, 0]  # the executor and its number of workers


def _forget_pool() -> None:
    """In a forked child: the parent's pool came along without its threads (only the
    forking thread survives a fork), so waiting on it would block forever; start afresh."""
    _pool[0], _pool[1] = None, 0


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _run(fn, chunks: np.ndarray, *args, rows: tuple | None = None) -> None:
    """fn(*args, [dw[t], db[t],] lo, hi) for every chunk t, in parallel; chunk 0 here."""
    n = len(chunks) - 1

    def call(t: int) -> None:
        extra = (rows[0][t], rows[1][t]) if rows is not None else ()
        fn(*args, *extra, chunks[t], chunks[t + 1])

    if n > 1 and _pool[1] < n - 1:
        from concurrent.futures import ThreadPoolExecutor

        _pool[0] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="normlab")
        _pool[1] = n - 1
    futures = [_pool[0].submit(call, t) for t in range(1, n)]
    call(0)
    for future in futures:
        future.result()


def forward(x, y, shape, gs, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, chunks, fused, part=FULL):  # fmt: skip
    """Batch statistics of every set (into mean, var, rstd: (A, C // gs) float64) and y.

    x, y: (A, B·C·D) contiguous; shape = (A, B, C, D). With ``gs > 1`` each set spans
    `gs` adjacent columns c (a short innermost reduced axis folded into c, D = 1):
    statistics are taken per column, then Chan-merged per set.
    """
    bf16 = x.dtype == np.uint16
    if fused:
        _run(_forward_fused_bf16 if bf16 else _forward_fused, chunks, x, y, shape, gs, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, part)  # fmt: skip
        return
    cdtype = np.float32 if bf16 else x.dtype
    mcol, rcol = np.empty((shape[0], shape[2]), cdtype), np.empty((shape[0], shape[2]), cdtype)
    stats(x, shape, gs, tasks, chunks, mean, var, rstd, eps, mcol, rcol, center)
    apply(x, y, shape, mcol, rcol, w, bias, oa, ob, oc, od, mode, tasks, chunks)


def apply(x, y, shape, mean, rstd, w, bias, oa, ob, oc, od, mode, tasks, chunks):
    """y = (x − mean)·rstd·w + bias with given per-column statistics (running estimates)."""
    _run(_apply_tasks_bf16 if x.dtype == np.uint16 else _apply_tasks, chunks, x, y, shape, mean, rstd, w, bias, oa, ob, oc, od, mode, tasks)  # fmt: skip


def backward(x, gy, gx, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, chunks, fused, dw, db, part=FULL, s1=None, s2=None):  # fmt: skip
    """gx, and per chunk the partial Σ gy·x̂ (dw[chunk]) and Σ gy (db[chunk]).

    mean, rstd: per column, (A, C). With ``batch`` the statistics were the batch's
    own, so gx carries the terms of their gradient (−mean(g), −x̂·mean(g·x̂)), summed
    over each set's `gs` columns; otherwise gx = gy·w·rstd.
    """
    bf16 = x.dtype == np.uint16
    if fused:
        if s1 is None:  # FULL: the per-set arrays are not used
            s1 = s2 = np.zeros((x.shape[0], max(1, shape[2] // gs)))
        # each chunk accumulates into its own row of dw, db: no two threads share one
        _run(_backward_fused_bf16 if bf16 else _backward_fused, chunks, x, gy, gx, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, part, s1, s2, rows=(dw, db))  # fmt: skip
        return
    s1, s2 = grad_sums(x, gy, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, tasks, chunks, dw, db)  # fmt: skip
    cdtype = np.float32 if bf16 else x.dtype
    n = float(shape[1] * shape[3] * gs)  # elements per set
    k1 = (s1 / n if batch and center else 0 * s1).astype(cdtype)
    k2 = (s2 / n if batch else 0 * s2).astype(cdtype)
    grad_input(x, gy, gx, shape, mean, rstd, k1, k2, w, oa, ob, oc, od, mode, tasks, chunks)


def split_tasks(
    shape: tuple[int, int, int, int], threads: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Tasks ``(a, b_lo, b_hi)``, chunk bounds (one chunk per thread, even work), and
    whether every task holds whole sets.

    Whole sets per task when there are enough of them to share out; otherwise each
    ``a`` is cut along ``b`` so that every thread gets work.
    """
    A, B, _, _ = shape
    if A >= 4 * threads or (A >= threads and A % threads == 0) or B == 1:
        tasks = np.stack([np.arange(A), np.zeros(A, np.int64), np.full(A, B)], axis=1)
    else:
        pieces = min(B, max(1, -(-16 * threads // A)))  # small tasks: cache reuse, balance
        edges = np.linspace(0, B, pieces + 1).round().astype(np.int64)
        tasks = np.array(
            [(a, edges[j], edges[j + 1]) for a in range(A) for j in range(pieces)], dtype=np.int64
        )
    ntasks = len(tasks)
    nchunks = max(1, min(threads, ntasks))
    chunks = np.linspace(0, ntasks, nchunks + 1).round().astype(np.int64)
    if nchunks > 1:  # the calling thread starts at once, a worker only once woken: give the
        # caller a head start's worth of extra tasks, so it does not wait for the worker
        per_task = A * B * shape[2] * shape[3] / ntasks
        extra = int(HEAD_START / per_task + 0.5)
        chunks[1] = min(chunks[1] + extra, chunks[2] - 1)
    fused = bool((tasks[:, 1] == 0).all() and (tasks[:, 2] == B).all())
    return np.ascontiguousarray(tasks, dtype=np.int64), chunks, fused


# The pieces of a two-pass call, for callers that compute something between them
# (statistics derived from other statistics: the hybrid norms).


def stats(x, shape, gs, tasks, chunks, mean, var, rstd, eps, mcol, rcol, center=True):
    """Batch statistics only: per set (mean, var, rstd) and per column (mcol, rcol)."""
    bf16 = x.dtype == np.uint16
    ntasks, C = len(tasks), shape[2]
    pmean, pm2, pcount = np.empty((ntasks, C)), np.empty((ntasks, C)), np.empty((ntasks, C))
    _run(_partial_stats_bf16 if bf16 else _partial_stats, chunks, x, shape, center, tasks, pmean, pm2, pcount)  # fmt: skip
    _merge_stats(tasks, pmean, pm2, pcount, gs, mean, var, rstd, eps, mcol, rcol)


def grad_sums(x, gy, shape, gs, mean, rstd, w, oa, ob, oc, od, mode, tasks, chunks, dw, db):
    """Per set, spread over its columns: Σ w·gy and Σ w·gy·x̂ ((A, C) float64 each).

    Also Σ gy·x̂ and Σ gy per affine entry, per chunk, into the rows of dw and db.
    """
    bf16 = x.dtype == np.uint16
    A, _, C, _ = shape
    psg, psgx = np.zeros((len(tasks), C)), np.zeros((len(tasks), C))
    _run(_partial_grad_sums_bf16 if bf16 else _partial_grad_sums, chunks, x, gy, shape, mean, rstd, w, oa, ob, oc, od, mode, tasks, psg, psgx, rows=(dw, db))  # fmt: skip
    s1, s2 = np.zeros((A, C)), np.zeros((A, C))
    _merge_grad_sums(tasks, psg, psgx, gs, 1.0, True, s1, s2)  # n = 1: sums, not means
    return s1, s2


def grad_input(x, gy, gx, shape, mean, rstd, k1, k2, w, oa, ob, oc, od, mode, tasks, chunks):
    """gx = rstd·(gy·w − k1 − x̂·k2) with per-column k1, k2 (A, C)."""
    bf16 = x.dtype == np.uint16
    _run(_grad_input_tasks_bf16 if bf16 else _grad_input_tasks, chunks, x, gy, gx, shape, mean, rstd, k1, k2, w, oa, ob, oc, od, mode, tasks)  # fmt: skip
