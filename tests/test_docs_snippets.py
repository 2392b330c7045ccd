"""Every ```python block of README.md and docs/*.md runs as printed.

Each block runs in a fresh namespace that holds only what the *user's* code would have there: the upstream
trainer's names (``VSE``, ``opt``, ``SCAN``, ``get_model``, ``config``, stand-ins with the upstream call structure),
the user's tensors (``img_emb``, ``caption_ids``, ...), ``optimizer``/``device``, and ``cache/coco_train`` (plus
``cache/coco_train_clip``, a second teacher pair of the same captions) in the working directory. Nothing from softalign is pre-imported, so a block that forgets an
import fails with NameError here, as it would for a reader who pastes it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text[: m.start()].count("\n") + 1
            out.append(pytest.param(m.group(1), id=f"{path.name}:{line}"))
    return out


N_IMG, K, B, D = 10, 5, 10, 32  # the cache holds 50 captions of 10 images; batches of 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with cache/coco_train (imported random teacher features), like a user's run directory."""
    from softalign.teachers.importers import import_npy

    d = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    import_npy(
        d / "cache" / "coco_train",
        rng.normal(size=(N_IMG, 12)).astype(np.float32),
        [i // K for i in range(N_IMG * K)],
        text_features=rng.normal(size=(N_IMG * K, 8)).astype(np.float32),
        progress=False,
    )
    # a second teacher pair over the same captions (docs/cache.md's TeacherEnsemble)
    import_npy(
        d / "cache" / "coco_train_clip",
        rng.normal(size=(N_IMG, 6)).astype(np.float32),
        [i // K for i in range(N_IMG * K)],
        text_features=rng.normal(size=(N_IMG * K, 5)).astype(np.float32),
        progress=False,
    )
    return d


def _user_names(workdir):
    """Factories of the names a snippet may use without importing them (the user's and the upstream's)."""
    from tests import test_integrations_common as common
    from tests import test_integrations_scan as scan_t
    from tests import test_integrations_teran as teran_t

    g = torch.Generator().manual_seed(0)

    def emb(n, d=D):
        return F.normalize(torch.randn(n, d, generator=g), dim=1)

    def user_loss():
        from softalign.losses import SoftAlignLoss
        from softalign.teachers import TeacherCache

        return SoftAlignLoss(embed_dim=1024, cache=TeacherCache.load(workdir / "cache" / "coco_train"))

    class Trainer:  # "a trainer you own": compute_loss(img_emb, txt_emb) inside train_step(batch, ids)
        def __init__(self):
            self.net = torch.nn.Linear(1024, 1024)
            self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1)

        def compute_loss(self, img_emb, txt_emb):
            return (img_emb @ txt_emb.T).diagonal().mean()

        def train_step(self, batch, ids):
            return self.compute_loss(self.net(batch[0]), batch[1])

    class ScoringModel:  # a user's model: encoders (for RetrievalEvaluator) and a pair scorer
        def encode_image(self, images, batch_size=64):
            return torch.as_tensor(images)

        def encode_text(self, captions, batch_size=64):
            return torch.as_tensor(captions)

        def score(self, a, b):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            if a.dim() == 1:  # indices
                return img_all[a] @ txt_all[b].T
            return a @ b.T

    # evaluation data: the 5K-image / 25K-caption size of COCO's test split, which the protocols expect
    img_all, txt_all = emb(5000, 16), emb(25000, 16)
    c2i = torch.arange(25000) // 5
    names = {
        # the one line and the loops a user owns
        "optimizer": lambda: torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
        "device": lambda: torch.device("cpu"),
        "img_emb": lambda: emb(B, 1024),
        "cap_emb": lambda: emb(B, 1024),
        "txt_emb": lambda: emb(B, 1024),
        "caption_ids": lambda: torch.arange(B) * 5 % (N_IMG * K),
        "ids": lambda: torch.arange(B),
        "img_feat": lambda: emb(B, 1024),
        "cap_feat": lambda: emb(B, 1024),
        "loss": user_loss,
        "cache": lambda: __import__("softalign.teachers", fromlist=["TeacherCache"]).TeacherCache.load(
            workdir / "cache" / "coco_train"
        ),
        "base_loss": lambda: torch.tensor(1.0, requires_grad=True),
        "trainer": Trainer,
        # data a user has for building a cache
        "captions": lambda: [f"caption {i}" for i in range(N_IMG * K)],
        "image_paths": lambda: _images(workdir),
        "caption_to_image": lambda: (torch.arange(N_IMG * K) // K).tolist(),
        # upstream trainers (stand-ins with their call structure)
        "VSE": lambda: common.VSEStandIn,
        "SCAN": lambda: scan_t.SCANStandIn,
        "opt": lambda: common.vse_opt(),
        "get_model": lambda: lambda config: teran_t.TERANStandIn(),
        "config": lambda: {"model": {"embed-size": D}},
        # evaluation inputs
        "img": lambda: img_all,
        "txt": lambda: txt_all,
        "c2i": lambda: c2i,
        "n": lambda: 5000,
        "S": lambda: img_all @ txt_all.T,
        "score_fn": lambda: lambda ii, cc: img_all[ii] @ txt_all[cc].T,
        "fine_scorer": lambda: lambda ii, cc: (img_all[ii] * txt_all[cc]).sum(-1),
        "image_labels": lambda: torch.arange(5000) % 50,
        "model": ScoringModel,
        "images": lambda: list(range(5000)),
        "img_feats": lambda: img_all,
        "cap_feats": lambda: txt_all,
        "q": lambda: emb(6),
        "q_labels": lambda: torch.arange(6) % 2,
        "g": lambda: emb(8),
        "g_labels": lambda: torch.arange(8) % 2,
        "emb_a": lambda: emb(7),
        "emb_b": lambda: emb(7),
        "gold_scores": lambda: torch.linspace(0, 1, 7),
        "test_images": lambda: emb(5000, 8),
        "test_captions": lambda: emb(25000, 8),
        "m_base": lambda: {"rsum": 300.0, "i2t_r1": 40.0},
        "m_cusa": lambda: {"rsum": 310.0, "i2t_r1": 42.0},
    }
    return names


def _images(workdir):
    from PIL import Image

    paths = []
    for i in range(N_IMG):
        p = workdir / "images" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 100, 200 - 10 * i)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("code", _blocks())
def test_snippet_runs_as_printed(code, workdir, tmp_path, monkeypatch):
    import shutil
    import warnings

    # a fresh working directory holding the user's cache/coco_train, unless the snippet builds that cache
    if 'TeacherCache.build("cache/coco_train"' not in code:
        shutil.copytree(workdir / "cache", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    # TeacherCache.build in a snippet would load the offline teachers: stand-ins keep the test small
    from tests.test_cache_support import FakeImageTeacher, FakeTextTeacher

    monkeypatch.setattr("softalign.teachers.text.resolve_text_teacher", lambda *a, **k: FakeTextTeacher())
    monkeypatch.setattr("softalign.teachers.image.resolve_image_teacher", lambda *a, **k: FakeImageTeacher())
    factories = _user_names(tmp_path)
    namespace = {"__name__": "__snippet__"}
    for name, make in factories.items():
        assigned = re.search(rf"^{re.escape(name)}\s*=", code, re.M)  # the snippet defines it itself
        if re.search(rf"\b{re.escape(name)}\b", code) and not assigned:
            namespace[name] = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a snippet's own warnings are not the point here
        exec(compile(code, "<snippet>", "exec"), namespace)
