"""Several teachers as one cache: weighted mean similarities, through every consumer of a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities
from softalign.teachers import TeacherEnsemble
from softalign.teachers.importers import import_npy


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from softalign.teachers import TeacherCache

    d = tmp_path_factory.mktemp("ens")
    rng = np.random.default_rng(0)
    c2i = [i // 2 for i in range(20)]
    out = []
    for k, (di, dt) in enumerate(((6, 5), (9, 4))):
        import_npy(
            d / f"t{k}",
            rng.normal(size=(10, di)).astype(np.float32),
            c2i,
            text_features=rng.normal(size=(20, dt)).astype(np.float32),
            progress=False,
        )
        out.append(TeacherCache.load(d / f"t{k}"))
    import_npy(
        d / "other",
        rng.normal(size=(10, 3)).astype(np.float32),
        [i % 10 for i in range(20)],
        text_features=rng.normal(size=(20, 3)).astype(np.float32),
        progress=False,
    )
    return out, TeacherCache.load(d / "other")


def test_similarities_are_the_weighted_mean_of_the_members(caches):
    (a, b), _ = caches
    ens = TeacherEnsemble([a, b], image_weights=[3, 1], text_weights=[1, 0])
    ids = torch.tensor([0, 3, 5, 8, 13, 19])
    sa, sb = a.similarities(ids), b.similarities(ids)
    got = ens.similarities(ids)
    torch.testing.assert_close(got.image, 0.75 * sa.image + 0.25 * sb.image)
    torch.testing.assert_close(got.text, sa.text)  # weight 0: the member's text teacher is left out
    img, txt = ens.embeddings(ids)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(6))
    assert txt.shape[1] == a.text_dim and torch.equal(ens.image_ids(ids), a.image_ids(ids))


def test_the_loss_on_an_ensemble_equals_the_loss_on_the_averaged_matrices(caches):
    (a, b), _ = caches
    ens = TeacherEnsemble([a, b])
    ids = torch.tensor([0, 2, 4, 7, 9, 11, 14, 17])
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)

    def run(**kw):
        torch.manual_seed(0)
        loss = SoftAlignLoss(
            embed_dim=12, base="infonce", teacher_temperature=0.2, **({"cache": ens} if not kw else {})
        )
        x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
        out = loss(x, y, ids=ids if not kw else None, image_ids=None if not kw else a.image_ids(ids), **kw)
        out.backward()
        return out.detach(), x.grad

    sa, sb = a.similarities(ids), b.similarities(ids)
    ref = run(teacher=TeacherSimilarities((sa.image + sb.image) / 2, (sa.text + sb.text) / 2))
    got = run()
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_ensemble_refuses_members_of_other_data_and_bad_weights(caches):
    (a, b), other = caches
    with pytest.raises(ValueError, match=r"cache 1 \(.*other\) describes other captions or images than cache 0"):
        TeacherEnsemble([a, other])
    with pytest.raises(ValueError, match=r"needs two or more teacher caches, got 1"):
        TeacherEnsemble([a])
    with pytest.raises(ValueError, match=r"image_weights has 3 entries for 2 teachers"):
        TeacherEnsemble([a, b], image_weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"text_weights must be >= 0 with a positive sum, got \[-1.0, 1.0\]"):
        TeacherEnsemble([a, b], text_weights=[-1, 1])


def test_an_ensemble_lookup_checks_the_ids_once_for_all_members(caches, monkeypatch):
    from softalign.teachers import TeacherCache

    (a, b), _ = caches
    ens = TeacherEnsemble([a, b])
    ids = torch.tensor([1, 4, 6, 12])
    calls = []
    real = TeacherCache._ids
    monkeypatch.setattr(TeacherCache, "_ids", lambda self, *x, **k: calls.append(1) or real(self, *x, **k))
    image_ids, img, txt = ens.lookup(ids)
    assert len(calls) == 1  # one id check, whatever the number of members
    sa, sb = a.similarities(ids), b.similarities(ids)  # the members' own look-ups, an independent path
    torch.testing.assert_close(img @ img.T, (sa.image + sb.image) / 2)
    torch.testing.assert_close(txt @ txt.T, (sa.text + sb.text) / 2)
    assert torch.equal(image_ids, a.image_ids(ids))
    with pytest.raises(ValueError, match="caption id 20 is out of range"):
        ens.lookup(torch.tensor([0, 20]))
