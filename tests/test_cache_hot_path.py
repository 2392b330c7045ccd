"""The teacher cache on the loss's hot path: one id look-up per step, the same values, no host sync."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities
from softalign.teachers import TeacherCache
from softalign.teachers.importers import import_npy


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("hot")
    rng = np.random.default_rng(0)
    import_npy(
        d / "c",
        rng.normal(size=(12, 10)).astype(np.float32),
        [i // 3 for i in range(36)],
        text_features=rng.normal(size=(36, 7)).astype(np.float32),
        progress=False,
    )
    return TeacherCache.load(d / "c")


def test_one_step_checks_and_maps_the_ids_once_with_the_values_of_the_separate_lookups(cache, monkeypatch):
    ids = torch.tensor([0, 4, 8, 13, 17, 22, 26, 31])
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)

    def run(**kw):
        torch.manual_seed(0)
        loss = SoftAlignLoss(
            embed_dim=16,
            base="infonce",
            teacher_temperature=0.2,
            diagnostics_every=0,
            cache=cache if "teacher_image_sim" not in kw else None,
        )
        x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
        out = loss(x, y, **kw)
        out.backward()
        return out.detach(), x.grad

    calls = []
    real = TeacherCache._ids
    monkeypatch.setattr(TeacherCache, "_ids", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = run(ids=ids)
    assert len(calls) == 1  # image ids and both teacher matrices from one checked look-up
    sims = cache.similarities(ids)  # the separate look-ups, as an independent path
    ref = run(image_ids=cache.image_ids(ids), teacher=TeacherSimilarities(sims.image, sims.text))
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_a_training_step_on_the_cache_syncs_nothing_after_the_first(cache):
    loss = SoftAlignLoss(embed_dim=16, base="infonce", teacher_temperature=0.2, cache=cache, diagnostics_every=0)
    ids = torch.tensor([1, 5, 7, 10, 14, 19, 23, 35])
    img, txt = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    loss(img, txt, ids=ids).backward()  # the first call checks the values once (one sync, by design)
    with CountOps() as mode:
        loss(img, txt, ids=ids).backward()
    assert mode.ops["aten._local_scalar_dense"] == 0  # no .item() / bool(tensor): the host never waits
    assert mode.ops["aten.index_select"] == 2  # one gather per teacher table
    assert mode.ops["aten.nonzero"] == 0
