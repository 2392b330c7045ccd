"""Benchmark: softalign.eval.cross_modal_recall vs a straightforward per-query loop of the VSE++
definitions (fartashf/vsepp evaluation.py i2t / t2i), on 1K x 5K and 5K x 25K, measured side by
side in one run; plus the two-stage re-ranking speed-up / recall change with a synthetic fine
scorer.

    python benchmarks/bench_eval.py            # 1K x 5K and 5K x 25K
    python benchmarks/bench_eval.py --quick    # 1K x 5K only

A. same score matrix: ``S = image @ text.T`` is computed once; the loop argsorts one row (i2t)
   or column (t2i) per query as VSE++ does, softalign counts over tiles of S. Numbers must be
   identical.
B. end to end from embeddings: VSE++ evaluation.py verbatim (a numpy dot per query, then
   argsort) vs softalign computing the scores tile by tile (never the full matrix). Float32 dot
   products from different kernels can round differently, so a near-tie may flip a rank; the
   number of such queries is printed.
D. a large gallery (``--faiss-captions``, default 100K captions): the tiled recall vs exact faiss top-K search
   (``softalign.eval.faiss_recall``), same R@K.
C. the floor: one bare ``[Ni, D] x [D, Nt]`` matmul of the same size, timed in the same rounds; recall time /
   matmul time says how close the tiled recall is to the limit (goal: within 2x).
Timings: interleaved rounds (``--rounds``, default 3): every round runs each variant once, in turn; min / median
are printed. The per-query loops take minutes at 5K x 25K: they run in the first round only (n=1), unless
``--loop-rounds``. All on --threads (default 1) threads.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # thread count must be fixed before numpy / torch load their BLAS
    _t = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _t

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import fmt, interleaved  # noqa: E402

from softalign.eval import cross_modal_recall, two_stage_rerank  # noqa: E402


def _vsepp_ranks_from_matrix(S, c2i):
    """VSE++ i2t / t2i loops over a given score matrix (rows = images)."""
    n_img, n_txt = S.shape
    i2t = np.zeros(n_img)
    for index in range(n_img):
        inds = np.argsort(S[index])[::-1]
        rank = 1e20
        for i in np.where(c2i == index)[0]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        i2t[index] = rank
    ST = np.ascontiguousarray(S.T)
    t2i = np.zeros(n_txt)
    for c in range(n_txt):
        inds = np.argsort(ST[c])[::-1]
        t2i[c] = np.where(inds == c2i[c])[0][0]
    return i2t, t2i


def _vsepp_ranks_verbatim(ims, caps, c2i):
    """VSE++ evaluation.py as written: a numpy dot per query image / per image's caption group."""
    n_img, n_txt = ims.shape[0], caps.shape[0]
    i2t = np.zeros(n_img)
    for index in range(n_img):
        d = np.dot(ims[index : index + 1], caps.T).flatten()
        inds = np.argsort(d)[::-1]
        rank = 1e20
        for i in np.where(c2i == index)[0]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        i2t[index] = rank
    t2i = np.zeros(n_txt)
    for index in range(n_img):
        q = np.where(c2i == index)[0]
        d = np.dot(caps[q], ims.T)
        for j, c in enumerate(q):
            inds = np.argsort(d[j])[::-1]
            t2i[c] = np.where(inds == index)[0][0]
    return i2t, t2i


def vsepp_metrics(i2t, t2i, ks=(1, 5, 10)):
    out = {}
    for pre, r in (("i2t_", i2t), ("t2i_", t2i)):
        for k in ks:
            out[f"{pre}r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
        out[pre + "medr"] = np.floor(np.median(r)) + 1
        out[pre + "meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{p}r{k}"] for p in ("i2t_", "t2i_") for k in ks)
    return out


def make_data(n_img, cpi, dim, seed=0, noise=1.2):
    g = torch.Generator().manual_seed(seed)
    im = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    c2i = torch.arange(n_img).repeat_interleave(cpi)
    tx = torch.nn.functional.normalize(
        im[c2i] + noise * torch.randn(n_img * cpi, dim, generator=g) / dim**0.5 * 4, dim=1
    )
    return im, tx, c2i


def _explain(S, c2i, ours, ri, rt):
    """Queries whose rank differs from the loop's, and whether each sits on an exact score tie
    between the (best) positive and another item (VSE++'s argsort leaves tie order arbitrary)."""
    di = np.nonzero(ours["i2t_ranks"].numpy() != ri)[0]
    dt = np.nonzero(ours["t2i_ranks"].numpy() != rt)[0]
    tied = 0
    for i in di:
        pos = np.where(c2i == i)[0]
        best = S[i, pos].max()
        neg = np.ones(S.shape[1], bool)
        neg[pos] = False
        tied += bool((S[i, neg] == best).any())
    for c in dt:
        col = S[:, c]
        tied += bool(((col == col[c2i[c]]).sum() - 1) > 0)
    n = len(di) + len(dt)
    if n == 0:
        return "rank differences: none"
    return (
        f"rank differences: {n} queries (i2t {len(di)}, t2i {len(dt)}); on an exact score tie with the positive: "
        f"{tied} (documented tie rule: ties go to the positive; VSE++ argsort order is arbitrary)"
    )


def bench_recall(n_img, cpi=5, dim=128, chunk=512, rounds=3, loop_rounds=False):
    im, tx, c2i = make_data(n_img, cpi, dim)
    c2i_np = c2i.numpy()
    label = f"{n_img}x{n_img * cpi} (D={dim}, float32, tiles of {chunk} images)"
    S = im @ tx.T  # A: the same similarity matrix for both (computed once, outside the timings)
    S_np = S.numpy()
    out = {}

    def keep(name, fn):
        def run():
            out[name] = fn()

        return run

    variants = {
        "A softalign (matrix)": keep(
            "A", lambda: cross_modal_recall(sims=S, caption_to_image=c2i, chunk_size=chunk, return_ranks=True)
        ),
        "A per-query loop": keep("A_ref", lambda: _vsepp_ranks_from_matrix(S_np, c2i_np)),
        "B softalign (embeddings)": keep(
            "B",
            lambda: cross_modal_recall(
                image_emb=im, text_emb=tx, caption_to_image=c2i, chunk_size=chunk, return_ranks=True
            ),
        ),
        "B VSE++ verbatim": keep("B_ref", lambda: _vsepp_ranks_verbatim(im.numpy(), tx.numpy(), c2i_np)),
        "C bare matmul": lambda: im @ tx.T,
    }
    loops = () if (loop_rounds or n_img <= 1000) else ("A per-query loop", "B VSE++ verbatim")  # minutes at 5K
    t = interleaved(variants, rounds=rounds, only_first_round=loops)
    print(f"{label}  [seconds, min / median over interleaved rounds]")
    for name, v in t.items():
        print(f"   {name:<26} {fmt(v)}")
    for part, ours, ref in (
        ("A", "A softalign (matrix)", "A per-query loop"),
        ("B", "B softalign (embeddings)", "B VSE++ verbatim"),
    ):
        ranks = out[f"{part}_ref"]
        reference = vsepp_metrics(*ranks)
        diff = {k: (out[part][k], reference[k]) for k in reference if out[part][k] != reference[k]}
        print(
            f"   {part}: loop / softalign (medians) {t[ref]['median'] / t[ours]['median']:.1f}x  "
            f"identical={not diff}" + (f" {diff}" if diff else "")
        )
        print("     " + _explain(S_np, c2i_np, out[part], *ranks))
    m = t["C bare matmul"]["median"]
    print(
        f"   recall / bare matmul (medians): from the matrix {t['A softalign (matrix)']['median'] / m:.2f}x, "
        f"from embeddings {t['B softalign (embeddings)']['median'] / m:.2f}x (goal: within 2x)"
    )
    ours = out["A"]
    print(
        "   "
        + "  ".join(
            f"{k}={ours[k]:.2f}"
            for k in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
        )
    )


def bench_large_gallery(n_captions, cpi=5, dim=128, rounds=2):
    """R@K on a large gallery: softalign's tiled recall (full ranks, bounded memory) vs exact faiss top-K."""
    from softalign.eval.faiss_recall import faiss_recall_at_k

    n_img = n_captions // cpi
    im, tx, c2i = make_data(n_img, cpi, dim, seed=3)
    out = {}
    t = interleaved(
        {
            "softalign tiled": lambda: out.__setitem__(
                "tiled", cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i)
            ),
            "faiss IndexFlatIP": lambda: out.__setitem__("faiss", faiss_recall_at_k(im, tx, c2i)),
        },
        rounds=rounds,
    )
    same = all(abs(out["tiled"][k] - out["faiss"][k]) < 1e-9 for k in out["faiss"])  # the same hit counts
    print(
        f"{n_img}x{n_captions} (D={dim}) R@K, seconds min / median: tiled {fmt(t['softalign tiled'])}, faiss "
        f"{fmt(t['faiss IndexFlatIP'])}; tiled / faiss (medians) "
        f"{t['softalign tiled']['median'] / t['faiss IndexFlatIP']['median']:.2f}x; same R@K={same}"
    )


def bench_two_stage(n_img=1000, cpi=5, dim=128, fine_dim=64, top_k=20):
    im, tx, c2i = make_data(n_img, cpi, dim, seed=1)
    # synthetic fine model: sees a less noisy view of each caption and scores 4 x 4 token pairs
    # (max-sim, as in late-interaction / token-level models): better than the embeddings, far costlier per pair
    g = torch.Generator().manual_seed(2)
    tx_fine = torch.nn.functional.normalize(
        im[c2i] + 0.6 * torch.randn(len(tx), dim, generator=g) / dim**0.5 * 4, dim=1
    )
    proj = torch.randn(dim, 4 * fine_dim, generator=g) / dim**0.5
    fi = (im @ proj).view(n_img, 4, -1)
    ft = (tx_fine @ proj).view(len(tx), 4, -1)

    def fine(ii, cc):
        out = []
        for s in range(0, ii.numel(), 65536):
            a, b = fi[ii[s : s + 65536]], ft[cc[s : s + 65536]]
            out.append(torch.einsum("pid,pjd->pij", a, b).amax(dim=2).mean(dim=1))
        return torch.cat(out)

    res = two_stage_rerank(im, tx, c2i, fine, top_k=top_k, chunk_size=256)
    print(
        f"two-stage {n_img}x{n_img * cpi}, top-K={top_k}: full fine scoring {res['time_full_fine_s']:.2f}s  "
        f"two-stage {res['time_two_stage_s']:.2f}s  speed-up {res['speedup']:.1f}x  "
        f"fine pairs {res['fine_pairs_two_stage']} vs {n_img * n_img * cpi}"
    )
    ts, ff, co, ch = res["two_stage"], res["full_fine"], res["coarse"], res["recall_change"]
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        print(f"   {k:7s} coarse {co[k]:6.2f}  two-stage {ts[k]:6.2f}  full fine {ff[k]:6.2f}  change {ch[k]:+.2f}")
    print(f"   targets outside the top-{top_k} (misses): i2t {ts['i2t_miss']:.2f}%  t2i {ts['t2i_miss']:.2f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=1, help="threads for both sides (default 1: a fair single-core comparison)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--loop-rounds", action="store_true", help="repeat the per-query loops in every round too")
    ap.add_argument(
        "--faiss-captions",
        type=int,
        default=100000,
        help="gallery size of the tiled vs faiss R@K comparison (0: skip; needs faiss-cpu)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    w_im, w_tx, w_c2i = make_data(50, 5, 128)  # warm-up both sides (thread pools, kernels)
    cross_modal_recall(image_emb=w_im, text_emb=w_tx, caption_to_image=w_c2i)
    _vsepp_ranks_verbatim(w_im.numpy(), w_tx.numpy(), w_c2i.numpy())
    bench_recall(1000, rounds=args.rounds, loop_rounds=args.loop_rounds)
    if not args.quick:
        bench_recall(5000, rounds=args.rounds, loop_rounds=args.loop_rounds)
    if args.faiss_captions:
        bench_large_gallery(args.faiss_captions)
    bench_two_stage()


if __name__ == "__main__":
    main()
