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

from __future__ import annotations

import numpy as np
from numba import njit, prange

FASTMATH = {"reassoc", "contract"}
BLOCK = 4096  # elements reduced per two-pass block: 16-32 KiB, stays in L1


@njit(cache=True, fastmath=FASTMATH)
def _block_shape(C, D):  # noqa: ANN001, ANN202
    if D >= BLOCK:
        return 1, 1, BLOCK
    if C * D >= BLOCK:
        return 1, BLOCK // D, D
    return max(1, BLOCK // (C * D)), C, D


@njit(cache=True, fastmath=FASTMATH)
def _stats(x, a, b_lo, b_hi, center, mean, m2, count, s, q, e):  # noqa: ANN001, ANN202
    """Mean, sum of squared deviations and count per c over x[a, b_lo:b_hi] (Chan-merged)."""
    _, _, C, D = x.shape
    bb, cb, db = _block_shape(C, D)
    for c in range(C):
        mean[c] = 0.0
        m2[c] = 0.0
        count[c] = 0.0
    for b0 in range(b_lo, b_hi, bb):
        b1 = min(b0 + bb, b_hi)
        for c0 in range(0, C, cb):
            c1 = min(c0 + cb, C)
            for d0 in range(0, D, db):
                d1 = min(d0 + db, D)
                n = float((b1 - b0) * (d1 - d0))
                for c in range(c0, c1):
                    s[c] = 0.0
                    q[c] = 0.0
                    e[c] = 0.0
                if center:  # pass 1: the block's mean
                    if D > 1:
                        for b in range(b0, b1):
                            for c in range(c0, c1):
                                t = 0.0
                                for d in range(d0, d1):
                                    t += x[a, b, c, d]
                                s[c] += t
                    else:
                        for b in range(b0, b1):
                            for c in range(c0, c1):
                                s[c] += x[a, b, c, 0]
                    for c in range(c0, c1):
                        s[c] /= n
                # pass 2 (the block is in cache): deviations from the block mean
                if D > 1:
                    for b in range(b0, b1):
                        for c in range(c0, c1):
                            m = s[c]
                            tq = 0.0
                            te = 0.0
                            for d in range(d0, d1):
                                v = x[a, b, c, d] - m
                                te += v
                                tq += v * v
                            q[c] += tq
                            e[c] += te
                else:
                    for b in range(b0, b1):
                        for c in range(c0, c1):
                            v = x[a, b, c, 0] - s[c]
                            e[c] += v
                            q[c] += v * v
                for c in range(c0, c1):
                    if center:
                        mb = s[c] + e[c] / n
                        qb = max(q[c] - e[c] * e[c] / n, 0.0)
                        tot = count[c] + n
                        delta = mb - mean[c]
                        mean[c] += delta * n / tot
                        m2[c] += qb + delta * delta * count[c] * n / tot
                        count[c] = tot
                    else:  # RMS: sum of squares around 0, no cancellation to fear
                        m2[c] += q[c]
                        count[c] += n


@njit(cache=True, fastmath=FASTMATH)
def _normalize(x, y, a, b_lo, b_hi, mean, rstd, w, bias, oa, ob, oc, od, mode):  # noqa: ANN001, ANN202
    """y = (x − mean)·rstd·w + bias over x[a, b_lo:b_hi]."""
    _, _, C, D = x.shape
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(C):
                m = mean[a, c]
                r = rstd[a, c]
                base = oa[a] + ob[b] + oc[c]
                if mode == 0:
                    scale = r * w[base]
                    shift = bias[base] - m * scale
                    for d in range(D):
                        y[a, b, c, d] = x[a, b, c, d] * scale + shift
                elif mode == 1:
                    for d in range(D):
                        y[a, b, c, d] = (x[a, b, c, d] - m) * r * w[base + d] + bias[base + d]
                else:
                    for d in range(D):
                        o = base + od[d]
                        y[a, b, c, d] = (x[a, b, c, d] - m) * r * w[o] + bias[o]
    else:
        for b in range(b_lo, b_hi):
            base = oa[a] + ob[b] + od[0]
            if mode == 0:
                wv = w[base]
                bv = bias[base]
                for c in range(C):
                    y[a, b, c, 0] = (x[a, b, c, 0] - mean[a, c]) * rstd[a, c] * wv + bv
            elif mode == 1:
                for c in range(C):
                    y[a, b, c, 0] = (x[a, b, c, 0] - mean[a, c]) * rstd[a, c] * w[
                        base + c
                    ] + bias[base + c]
            else:
                for c in range(C):
                    o = base + oc[c]
                    y[a, b, c, 0] = (x[a, b, c, 0] - mean[a, c]) * rstd[a, c] * w[o] + bias[o]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward(x, y, mean, var, rstd, w, bias, oa, ob, oc, od, mode, eps, center, tasks, chunks):  # noqa: ANN001, ANN201
    """Batch statistics of every set (into mean, var, rstd: (A, C) float64) and y."""
    _, B, C, _ = x.shape
    ntasks = tasks.shape[0]
    fused = True
    for i in range(ntasks):
        if tasks[i, 1] != 0 or tasks[i, 2] != B:
            fused = False
    if fused:
        for t in prange(chunks.shape[0] - 1):
            pm = np.empty(C)
            pq = np.empty(C)
            pn = np.empty(C)
            s = np.empty(C)
            q = np.empty(C)
            e = np.empty(C)
            for i in range(chunks[t], chunks[t + 1]):
                a = tasks[i, 0]
                _stats(x, a, 0, B, center, pm, pq, pn, s, q, e)
                for c in range(C):
                    v = pq[c] / pn[c]
                    mean[a, c] = pm[c]
                    var[a, c] = v
                    rstd[a, c] = 1.0 / np.sqrt(v + eps)
                _normalize(x, y, a, 0, B, mean, rstd, w, bias, oa, ob, oc, od, mode)
        return
    pmean = np.empty((ntasks, C))
    pm2 = np.empty((ntasks, C))
    pcount = np.empty((ntasks, C))
    for t in prange(chunks.shape[0] - 1):
        s = np.empty(C)
        q = np.empty(C)
        e = np.empty(C)
        for i in range(chunks[t], chunks[t + 1]):
            _stats(
                x, tasks[i, 0], tasks[i, 1], tasks[i, 2], center, pmean[i], pm2[i], pcount[i], s, q, e
            )
    A = mean.shape[0]
    done = np.zeros(A, dtype=np.bool_)
    tot = np.zeros((A, C))
    for i in range(ntasks):  # Chan-merge the partial statistics, task by task
        a = tasks[i, 0]
        for c in range(C):
            n = pcount[i, c]
            if not done[a]:
                mean[a, c] = pmean[i, c]
                var[a, c] = pm2[i, c]
            elif n > 0:
                t2 = tot[a, c] + n
                delta = pmean[i, c] - mean[a, c]
                mean[a, c] += delta * n / t2
                var[a, c] += pm2[i, c] + delta * delta * tot[a, c] * n / t2
            tot[a, c] += n
        done[a] = True
    for a in range(A):
        for c in range(C):
            v = var[a, c] / tot[a, c]
            var[a, c] = v
            rstd[a, c] = 1.0 / np.sqrt(v + eps)
    for t in prange(chunks.shape[0] - 1):
        for i in range(chunks[t], chunks[t + 1]):
            _normalize(
                x, y, tasks[i, 0], tasks[i, 1], tasks[i, 2], mean, rstd, w, bias, oa, ob, oc, od, mode
            )


@njit(cache=True, fastmath=FASTMATH)
def _grad_sums(x, gy, a, b_lo, b_hi, mean, rstd, w, oa, ob, oc, od, mode, sg, sgx, dw, db):  # noqa: ANN001, ANN202
    """Per c: Σ gy·w and Σ gy·w·x̂ over x[a, b_lo:b_hi]; Σ gy·x̂ and Σ gy into dw, db."""
    _, _, C, D = x.shape
    for c in range(C):
        sg[c] = 0.0
        sgx[c] = 0.0
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(C):
                m = mean[a, c]
                r = rstd[a, c]
                base = oa[a] + ob[b] + oc[c]
                if mode == 0:
                    tg = 0.0
                    tgx = 0.0
                    for d in range(D):
                        g = gy[a, b, c, d]
                        tg += g
                        tgx += g * (x[a, b, c, d] - m)
                    tgx *= r
                    sg[c] += tg * w[base]
                    sgx[c] += tgx * w[base]
                    dw[base] += tgx
                    db[base] += tg
                else:
                    tg = 0.0
                    tgx = 0.0
                    for d in range(D):
                        o = base + d if mode == 1 else base + od[d]
                        g = gy[a, b, c, d]
                        xh = (x[a, b, c, d] - m) * r
                        tg += g * w[o]
                        tgx += g * w[o] * xh
                        dw[o] += g * xh
                        db[o] += g
                    sg[c] += tg
                    sgx[c] += tgx
    else:
        for b in range(b_lo, b_hi):
            base = oa[a] + ob[b] + od[0]
            if mode == 0:
                tdw = 0.0
                tdb = 0.0
                wv = w[base]
                for c in range(C):
                    g = gy[a, b, c, 0]
                    xh = (x[a, b, c, 0] - mean[a, c]) * rstd[a, c]
                    sg[c] += g * wv
                    sgx[c] += g * wv * xh
                    tdw += g * xh
                    tdb += g
                dw[base] += tdw
                db[base] += tdb
            else:
                for c in range(C):
                    o = base + c if mode == 1 else base + oc[c]
                    g = gy[a, b, c, 0]
                    xh = (x[a, b, c, 0] - mean[a, c]) * rstd[a, c]
                    sg[c] += g * w[o]
                    sgx[c] += g * w[o] * xh
                    dw[o] += g * xh
                    db[o] += g


@njit(cache=True, fastmath=FASTMATH)
def _grad_input(x, gy, gx, a, b_lo, b_hi, mean, rstd, k1, k2, w, oa, ob, oc, od, mode):  # noqa: ANN001, ANN202
    """gx = rstd·(gy·w − k1 − x̂·k2) over x[a, b_lo:b_hi] (k1, k2 per set)."""
    _, _, C, D = x.shape
    if D > 1:
        for b in range(b_lo, b_hi):
            for c in range(C):
                m = mean[a, c]
                r = rstd[a, c]
                u = k1[a, c]
                v = k2[a, c]
                base = oa[a] + ob[b] + oc[c]
                if mode == 0:
                    alpha = r * w[base]
                    beta = -r * r * v
                    gamma = -r * u - m * beta
                    for d in range(D):
                        gx[a, b, c, d] = gy[a, b, c, d] * alpha + x[a, b, c, d] * beta + gamma
                else:
                    for d in range(D):
                        o = base + d if mode == 1 else base + od[d]
                        xh = (x[a, b, c, d] - m) * r
                        gx[a, b, c, d] = r * (gy[a, b, c, d] * w[o] - u - xh * v)
    else:
        for b in range(b_lo, b_hi):
            base = oa[a] + ob[b] + od[0]
            for c in range(C):
                o = base if mode == 0 else (base + c if mode == 1 else base + oc[c])
                r = rstd[a, c]
                xh = (x[a, b, c, 0] - mean[a, c]) * r
                gx[a, b, c, 0] = r * (gy[a, b, c, 0] * w[o] - k1[a, c] - xh * k2[a, c])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def backward(x, gy, gx, mean, rstd, w, oa, ob, oc, od, mode, batch, center, tasks, chunks, dw, db):  # noqa: ANN001, ANN201
    """gx, and per chunk the partial Σ gy·x̂ (dw[chunk]) and Σ gy (db[chunk]).

    With ``batch`` the statistics were the batch's own, so gx carries the terms of
    their gradient (−mean(g), −x̂·mean(g·x̂)); otherwise gx = gy·w·rstd.
    """
    A, B, C, D = x.shape
    ntasks = tasks.shape[0]
    n = float(B * D)
    fused = True
    for i in range(ntasks):
        if tasks[i, 1] != 0 or tasks[i, 2] != B:
            fused = False
    k1 = np.zeros((A, C))
    k2 = np.zeros((A, C))
    if fused:
        for t in prange(chunks.shape[0] - 1):
            sg = np.empty(C)
            sgx = np.empty(C)
            for i in range(chunks[t], chunks[t + 1]):
                a = tasks[i, 0]
                _grad_sums(x, gy, a, 0, B, mean, rstd, w, oa, ob, oc, od, mode, sg, sgx, dw[t], db[t])
                if batch:
                    for c in range(C):
                        k1[a, c] = sg[c] / n if center else 0.0
                        k2[a, c] = sgx[c] / n
                _grad_input(x, gy, gx, a, 0, B, mean, rstd, k1, k2, w, oa, ob, oc, od, mode)
        return
    psg = np.empty((ntasks, C))
    psgx = np.empty((ntasks, C))
    for t in prange(chunks.shape[0] - 1):
        for i in range(chunks[t], chunks[t + 1]):
            _grad_sums(
                x, gy, tasks[i, 0], tasks[i, 1], tasks[i, 2], mean, rstd, w, oa, ob, oc, od, mode,
                psg[i], psgx[i], dw[t], db[t],
            )  # fmt: skip
    if batch:
        for i in range(ntasks):
            a = tasks[i, 0]
            for c in range(C):
                k1[a, c] += psg[i, c] / n if center else 0.0
                k2[a, c] += psgx[i, c] / n
    for t in prange(chunks.shape[0] - 1):
        for i in range(chunks[t], chunks[t + 1]):
            _grad_input(
                x, gy, gx, tasks[i, 0], tasks[i, 1], tasks[i, 2], mean, rstd, k1, k2, w,
                oa, ob, oc, od, mode,
            )  # fmt: skip


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def apply(x, y, mean, rstd, w, bias, oa, ob, oc, od, mode, tasks, chunks):  # noqa: ANN001, ANN201
    """y = (x − mean)·rstd·w + bias with given statistics (running estimates, say)."""
    for t in prange(chunks.shape[0] - 1):
        for i in range(chunks[t], chunks[t + 1]):
            _normalize(
                x, y, tasks[i, 0], tasks[i, 1], tasks[i, 2], mean, rstd, w, bias, oa, ob, oc, od, mode
            )


def split_tasks(shape: tuple[int, int, int, int], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Tasks ``(a, b_lo, b_hi)`` and chunk bounds (one chunk per thread, even work).

    Whole sets per task when there are enough of them to share out; otherwise each
    ``a`` is cut along ``b`` so that every thread gets work.
    """
    A, B, _, _ = shape
    if A >= 4 * threads or (A >= threads and A % threads == 0) or B == 1:
        tasks = np.stack([np.arange(A), np.zeros(A, np.int64), np.full(A, B)], axis=1)
    else:
        pieces = min(B, max(1, -(-4 * threads // A)))
        edges = np.linspace(0, B, pieces + 1).round().astype(np.int64)
        tasks = np.array(
            [(a, edges[j], edges[j + 1]) for a in range(A) for j in range(pieces)], dtype=np.int64
        )
    ntasks = len(tasks)
    nchunks = max(1, min(threads, ntasks))
    chunks = np.linspace(0, ntasks, nchunks + 1).round().astype(np.int64)
    return np.ascontiguousarray(tasks, dtype=np.int64), chunks
