"""Independent, loop-based reference implementations of the loss formulas (numpy, float64).

Written straight from the papers' definitions, with no code shared with softalign.functional.
"""

from __future__ import annotations

import math

import numpy as np


def softmax_row(row, t):
    z = [x / t for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def kl_rows(student, teacher, t_student, t_teacher):
    total = 0.0
    for srow, trow in zip(student, teacher):
        p = softmax_row(trow, t_teacher)
        q = softmax_row(srow, t_student)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    return total / len(student)


def transpose(m):
    return [list(r) for r in zip(*m)]


def csa(scores, t_img, t_txt, tau_c, tau_s, mode="each"):
    scores, t_img, t_txt = (np.asarray(x, dtype=np.float64).tolist() for x in (scores, t_img, t_txt))
    n = len(scores)
    if mode == "each":
        a, b = t_img, t_txt
    elif mode == "add":
        a = b = [[(t_img[i][j] + t_txt[i][j]) / 2 for j in range(n)] for i in range(n)]
    else:
        a = b = [[math.sqrt(max(t_img[i][j], 0) * max(t_txt[i][j], 0)) for j in range(n)] for i in range(n)]
    return (kl_rows(scores, a, tau_c, tau_s) + kl_rows(transpose(scores), b, tau_c, tau_s)) / 2


def usa(s_ii, s_tt, t_ii, t_tt, tau_i, tau_t, tau_s):
    conv = lambda x: np.asarray(x, dtype=np.float64).tolist()  # noqa: E731
    return (kl_rows(conv(s_ii), conv(t_ii), tau_i, tau_s) + kl_rows(conv(s_tt), conv(t_tt), tau_t, tau_s)) / 2


def vsepp(scores, image_ids, margin, max_violation):
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    total = 0.0
    for p in range(n):
        costs_i2t = [max(0.0, margin - s[p, p] + s[p, k]) for k in range(n) if image_ids[k] != image_ids[p]]
        costs_t2i = [max(0.0, margin - s[p, p] + s[k, p]) for k in range(n) if image_ids[k] != image_ids[p]]
        if max_violation:
            total += (max(costs_i2t) if costs_i2t else 0.0) + (max(costs_t2i) if costs_t2i else 0.0)
        else:
            total += sum(costs_i2t) + sum(costs_t2i)
    return total


def info_nce(scores, t, image_ids):
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]

    def direction(m):
        out = 0.0
        for i in range(n):
            pos = [j for j in range(n) if image_ids[j] == image_ids[i]]
            logz = math.log(sum(math.exp(m[i, k] / t) for k in range(n)))
            out += -sum((m[i, j] / t - logz) / len(pos) for j in pos)
        return out / n

    return (direction(s) + direction(s.T)) / 2


def cosine(a):
    a = np.asarray(a, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ a.T


def intra(s_ii, s_tt, margin):
    s_ii, s_tt = np.asarray(s_ii, dtype=np.float64), np.asarray(s_tt, dtype=np.float64)
    n = s_ii.shape[0]
    total = 0.0
    for j in range(n):
        worst = max(abs(s_tt[i, j] - s_ii[i, j]) for i in range(n))
        total += max(0.0, worst - margin)
    return total
