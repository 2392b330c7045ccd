"""Stand-ins shared by the integration tests, and tests of the shared hook / generic patch.

The stand-ins reproduce only the *call structure* of the upstream trainers (fartashf/vsepp, kuanghuei/SCAN,
mesnico/TERAN): which method calls which, with which arguments, what the collate function returns and how
checkpoints are saved. Their bodies are written here from scratch at toy size.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from softalign.integrations import generic
from softalign.integrations._common import SoftAlignHook, as_ids
from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities

N_IMAGES, CAPS_PER_IMAGE, IMG_DIM, VOCAB, EMBED = 8, 5, 12, 16 + 40, 16
N_CAPTIONS = N_IMAGES * CAPS_PER_IMAGE
ID_TOKEN0 = 16  # token 16 + caption id is the caption's second token: rows can be traced back to their ids


@pytest.fixture(autouse=True)
def single_thread():
    """Toy-sized steps run fastest on one thread (and do not fight other processes for the shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# tiny precomputed data set (VSE++/SCAN "precomp" layout: image features, 5 captions per image)


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N_IMAGES, IMG_DIM, generator=g)
    captions = []
    for cid in range(N_CAPTIONS):
        img = cid // CAPS_PER_IMAGE
        length = 3 + (cid * 7) % 5  # varied lengths, so sorting by length reorders the batch
        words = [1, ID_TOKEN0 + cid] + [2 + (img + k) % 14 for k in range(length - 2)]
        captions.append(torch.tensor(words, dtype=torch.long))
    return images, captions


class PrecompDataset(torch.utils.data.Dataset):
    """``__getitem__(index) -> (image, caption, index, image index)`` like the upstream precomp datasets."""

    def __init__(self, images, captions, regions: int = 0):
        self.images, self.captions, self.regions = images, captions, regions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        img = index // CAPS_PER_IMAGE
        feat = self.images[img]
        if self.regions:  # SCAN/TERAN: a set of region features per image
            feat = torch.stack([feat.roll(r) for r in range(self.regions)])
        return feat, self.captions[index], index, img


def sort_collate(batch):
    """Sorts the batch by caption length (longest first) and returns ``images, targets, lengths, ids``."""
    batch = sorted(batch, key=lambda item: len(item[1]), reverse=True)
    images = torch.stack([b[0] for b in batch])
    lengths = [len(b[1]) for b in batch]
    targets = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for row, b in enumerate(batch):
        targets[row, : lengths[row]] = b[1]
    ids = tuple(b[2] for b in batch)
    return images, targets, lengths, ids


def loader(regions: int = 0, batch_size: int = 10, seed: int = 0):
    images, captions = make_data()
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        PrecompDataset(images, captions, regions),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=sort_collate,
        generator=g,
    )


def ids_from_targets(targets):
    """Caption id of each row, read back from its tokens (independent of the ids the collate returned)."""
    return targets[:, 1] - ID_TOKEN0


class LogCollector:
    def __init__(self):
        self.values = {}

    def update(self, key, value, n=0):
        self.values.setdefault(key, []).append(value)


# ----------------------------------------------------------------------------------------------
# teacher stand-in: the contract's cache methods over fixed teacher embeddings


class TinyCache:
    def __init__(self, dim: int = 6, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.image_table = torch.randn(N_IMAGES, dim, generator=g)
        self.text_table = self.image_table.repeat_interleave(CAPS_PER_IMAGE, 0) + 0.3 * torch.randn(
            N_CAPTIONS, dim, generator=g
        )
        self.caption_to_image = torch.arange(N_CAPTIONS) // CAPS_PER_IMAGE
        self.calls = 0

    def image_ids(self, ids):
        return self.caption_to_image[torch.as_tensor(ids).cpu()]

    def embeddings(self, ids, device=None):
        ids = torch.as_tensor(ids).cpu()
        img = F.normalize(self.image_table[self.image_ids(ids)], dim=1)
        txt = F.normalize(self.text_table[ids], dim=1)
        return img.to(device), txt.to(device)

    def lookup(self, ids, device=None):
        self.calls += 1
        ids = torch.as_tensor(ids).cpu()
        return (self.image_ids(ids).to(device), *self.embeddings(ids, device))


def teacher_sims(cache, ids):
    """Independent teacher similarities for the test's own expected values."""
    ids = torch.as_tensor(ids)
    img = F.normalize(cache.image_table[ids // CAPS_PER_IMAGE], dim=1)
    txt = F.normalize(cache.text_table[ids], dim=1)
    return img @ img.t(), txt @ txt.t()


# ----------------------------------------------------------------------------------------------
# VSE++ call structure: plain object, train_emb -> forward_emb -> forward_loss -> criterion(im, s)


def l2norm(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True).clamp(min=1e-8)


class ImagePrecompEncoder(nn.Module):
    def __init__(self, img_dim, embed):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed)

    def forward(self, images):
        return l2norm(self.fc(images))


class GRUTextEncoder(nn.Module):
    """Word embedding + GRU; returns the last valid state ([B, D]) or every word state ([B, W, D], lengths)."""

    def __init__(self, vocab, word_dim, embed, per_word: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, word_dim)
        self.rnn = nn.GRU(word_dim, embed, batch_first=True)
        self.per_word = per_word

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True)
        out, _ = self.rnn(packed)
        padded, lens = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        if self.per_word:
            return l2norm(padded), list(lens.tolist())
        last = padded[torch.arange(x.shape[0]), lens - 1]
        return l2norm(last)


def hinge_criterion(scores, margin, max_violation):
    """The upstream criterion's arithmetic: diagonal positives, hinge per row and column."""
    diagonal = scores.diag().view(-1, 1)
    cost_s = (margin + scores - diagonal).clamp(min=0)
    cost_im = (margin + scores - diagonal.t()).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_s, cost_im = cost_s.masked_fill(eye, 0), cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def id_aware_hinge(scores, image_ids, margin, max_violation):
    """VSE++ hinge where every caption of the row's image is a positive (never a negative)."""
    pos = image_ids.view(-1, 1) == image_ids.view(1, -1)
    d = scores.diag()
    cost_s = (margin + scores - d.view(-1, 1)).clamp(min=0).masked_fill(pos, 0)
    cost_im = (margin + scores - d.view(1, -1)).clamp(min=0).masked_fill(pos, 0)
    if max_violation:
        return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
    return cost_s.sum() + cost_im.sum()


class VSEContrastiveLoss(nn.Module):
    def __init__(self, margin=0.2, max_violation=True):
        super().__init__()
        self.margin, self.max_violation = margin, max_violation

    def forward(self, im, s):
        return hinge_criterion(im @ s.t(), self.margin, self.max_violation)


def vse_opt(**kw):
    base = dict(
        img_dim=IMG_DIM,
        embed_size=EMBED,
        word_dim=8,
        vocab_size=VOCAB,
        margin=0.2,
        max_violation=True,
        learning_rate=0.01,
        grad_clip=2.0,
        cross_attn="t2i",
        lambda_softmax=4.0,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


class VSEStandIn:
    """Call structure of VSE++'s ``VSE`` object (not its code)."""

    def __init__(self, opt):
        self.grad_clip = opt.grad_clip
        self.img_enc = ImagePrecompEncoder(opt.img_dim, opt.embed_size)
        self.txt_enc = GRUTextEncoder(opt.vocab_size, opt.word_dim, opt.embed_size)
        self.criterion = VSEContrastiveLoss(opt.margin, opt.max_violation)
        self.params = list(self.txt_enc.parameters()) + list(self.img_enc.fc.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=opt.learning_rate)
        self.Eiters = 0
        self.logger = LogCollector()

    def state_dict(self):
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

    def load_state_dict(self, state_dict):
        self.img_enc.load_state_dict(state_dict[0])
        self.txt_enc.load_state_dict(state_dict[1])

    def train_start(self):
        self.img_enc.train()
        self.txt_enc.train()

    def val_start(self):
        self.img_enc.eval()
        self.txt_enc.eval()

    def forward_emb(self, images, captions, lengths):
        return self.img_enc(images), self.txt_enc(captions, lengths)

    def forward_loss(self, img_emb, cap_emb, **kwargs):
        loss = self.criterion(img_emb, cap_emb)
        self.logger.update("Le", loss.item(), img_emb.size(0))
        return loss

    def train_emb(self, images, captions, lengths, ids=None, *args):
        self.Eiters += 1
        img_emb, cap_emb = self.forward_emb(images, captions, lengths)
        self.optimizer.zero_grad()
        loss = self.forward_loss(img_emb, cap_emb)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.last_loss = float(loss.detach())  # test-only probe


def train(model, epochs: int, regions: int = 0, step=None):
    """The upstream train loop's shape: ``model.train_emb(*train_data)`` per batch."""
    losses = []
    for _ in range(epochs):
        for batch in loader(regions):
            if step is None:
                model.train_emb(*batch)
                losses.append(model.last_loss)
            else:
                losses.append(step(model, batch))
    return losses


def soft_loss(**kw):
    cfg = dict(embed_dim=EMBED, alpha=0.5, beta=0.5, gamma=0.0)
    cfg.update(kw)
    return SoftAlignLoss(**cfg)


def record_loss_inputs(loss):
    """Forward pre-hook recording the keyword arguments each SoftAlignLoss call receives."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({"args": args, **kwargs})

    loss.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# ----------------------------------------------------------------------------------------------
# tests of the shared pieces


def test_as_ids_accepts_collate_tuples_and_rejects_bad_ids():
    assert as_ids((3, 1, 2)).tolist() == [3, 1, 2]
    assert as_ids((3, 1, 2)).dtype == torch.long
    with pytest.raises(TypeError, match="integer caption ids"):
        as_ids(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        as_ids(torch.zeros(2, 2, dtype=torch.long))


def test_hook_terms_match_direct_loss_call_with_explicit_teacher():
    cache = TinyCache()
    loss = soft_loss(gamma=0.3)
    hook = SoftAlignHook(loss, cache=cache)
    ids = torch.tensor([7, 3, 12, 0, 39, 21])
    img, txt = torch.randn(6, EMBED), torch.randn(6, EMBED)
    parts = hook(img, txt, ids)
    t_img, t_txt = teacher_sims(cache, ids)
    expected = loss(img, txt, image_ids=ids // CAPS_PER_IMAGE, teacher=TeacherSimilarities(t_img, t_txt))
    assert torch.allclose(parts["loss"], expected)
    weighted = hook.weighted(parts)
    assert set(weighted) == {"base", "csa", "usa", "cmc"}
    assert torch.allclose(sum(weighted.values()), expected)
    assert torch.allclose(hook.soft_terms(parts), expected - weighted["base"])
    assert loss.return_parts is False  # the hook's temporary switch is undone


def test_hook_without_cache_uses_captions_per_image_and_needs_teacher_for_soft_terms():
    with pytest.raises(ValueError, match="need teacher similarities"):
        SoftAlignHook(soft_loss(), captions_per_image=5)
    with pytest.raises(ValueError, match="captions_per_image"):
        SoftAlignHook(soft_loss(alpha=0.0, beta=0.0, gamma=1.0))
    with pytest.raises(ValueError, match="positive integer"):
        SoftAlignHook(soft_loss(alpha=0.0, beta=0.0, gamma=1.0), captions_per_image=0)
    hook = SoftAlignHook(soft_loss(alpha=0.0, beta=0.0, gamma=1.0), captions_per_image=5)
    assert hook.image_ids(torch.tensor([0, 4, 5, 39])).tolist() == [0, 0, 1, 7]
    with pytest.raises(ValueError, match="3 caption ids for a batch of 2"):
        hook(torch.randn(2, EMBED), torch.randn(2, EMBED), [1, 2, 3])
    with pytest.raises(ValueError, match="needs the batch's caption ids"):
        hook(torch.randn(2, EMBED), torch.randn(2, EMBED), None)


def test_soft_align_step_for_a_loop_you_own():
    cache = TinyCache()
    loss = soft_loss(base="none")
    ids = torch.tensor([5, 6, 10, 30])
    img, txt = torch.randn(4, EMBED, requires_grad=True), torch.randn(4, EMBED)
    out = generic.soft_align_step(loss, img, txt, ids, cache=cache)
    t_img, t_txt = teacher_sims(cache, ids)
    direct = loss(img, txt, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt))
    assert torch.allclose(out["soft"], direct) and torch.allclose(out["loss"], direct)
    assert "base" not in out and set(out) == {"loss", "soft", "csa", "usa"}
    out["soft"].backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


class OwnTrainer:
    """A trainer whose loss method receives the ids itself and returns one tensor."""

    def __init__(self):
        self.proj = nn.Linear(IMG_DIM, EMBED)
        self.calls = 0

    def compute_loss(self, img_emb, cap_emb, ids=None):
        self.calls += 1
        return hinge_criterion(l2norm(img_emb) @ l2norm(cap_emb).t(), 0.2, True)


class NoIdsTrainer(OwnTrainer):
    def compute_loss(self, img_emb, cap_emb):
        self.calls += 1
        return (img_emb - cap_emb).pow(2).sum()


def test_generic_patch_adds_terms_keeps_criterion_with_base_none_and_unpatches():
    cache = TinyCache()
    trainer = OwnTrainer()
    loss = soft_loss(base="none")
    opt = torch.optim.SGD(trainer.proj.parameters(), lr=0.1)
    generic.patch(trainer, loss, loss_method="compute_loss", cache=cache, optimizer=opt)
    assert len(opt.param_groups) == 2
    ids = torch.tensor([1, 9, 17, 33])
    img, txt = torch.randn(4, EMBED), torch.randn(4, EMBED)
    got = trainer.compute_loss(img, txt, ids=ids)
    t_img, t_txt = teacher_sims(cache, ids)
    expected = hinge_criterion(l2norm(img) @ l2norm(txt).t(), 0.2, True) + loss(
        img, txt, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt)
    )
    assert torch.allclose(got, expected)
    # without ids: the trainer's loss, unchanged
    assert torch.allclose(trainer.compute_loss(img, txt), hinge_criterion(l2norm(img) @ l2norm(txt).t(), 0.2, True))
    generic.unpatch(trainer)
    assert "compute_loss" not in trainer.__dict__ and len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="not patched"):
        generic.unpatch(trainer)


def test_generic_patch_replaces_criterion_when_loss_has_base_and_strips_ids():
    cache = TinyCache()
    trainer = NoIdsTrainer()
    loss = soft_loss(base="vsepp")
    generic.patch(trainer, loss, loss_method="compute_loss", cache=cache)
    ids = torch.tensor([2, 3, 20, 25])
    img, txt = torch.randn(4, EMBED), torch.randn(4, EMBED)
    got = trainer.compute_loss(img, txt, ids=ids)  # NoIdsTrainer.compute_loss takes no ids: stripped
    t_img, t_txt = teacher_sims(cache, ids)
    assert torch.allclose(got, loss(img, txt, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt)))
    assert trainer.calls == 0  # replaced, not computed and thrown away
    with pytest.raises(ValueError, match="already patched"):
        generic.patch(trainer, loss, loss_method="compute_loss", cache=cache)


def test_generic_patch_dict_returning_method_and_bad_names():
    class DictTrainer:
        def losses(self, a, b, ids=None):
            return {"mine": (a - b).pow(2).mean()}

    cache = TinyCache()
    trainer = DictTrainer()
    loss = soft_loss(base="vsepp")
    generic.patch(trainer, loss, loss_method="losses", cache=cache, returns="dict")
    ids = torch.tensor([0, 8, 16])
    a, b = torch.randn(3, EMBED), torch.randn(3, EMBED)
    out = trainer.losses(a, b, ids=ids)
    assert set(out) == {"mine", "softalign-base", "csa", "usa"}
    t_img, t_txt = teacher_sims(cache, ids)
    total = loss(a, b, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt))
    assert torch.allclose(sum(v for k, v in out.items() if k != "mine"), total)
    with pytest.raises(TypeError, match="has no method 'nope'"):
        generic.patch(DictTrainer(), loss, loss_method="nope", cache=cache)
    with pytest.raises(ValueError, match="returns must be"):
        generic.patch(DictTrainer(), loss, loss_method="losses", cache=cache, returns="list")


def test_generic_patch_takes_ids_from_the_step_method():
    class StepTrainer:
        def __init__(self):
            self.enc = nn.Linear(IMG_DIM, EMBED)
            self.optimizer = torch.optim.SGD(self.enc.parameters(), lr=0.1)

        def compute_loss(self, img_emb, txt_emb):
            return (img_emb - txt_emb).pow(2).sum()

        def train_step(self, batch, ids):
            img, txt = self.enc(batch), self.enc(batch).flip(0)
            self.last = self.compute_loss(img, txt)
            return img, txt

    cache = TinyCache()
    trainer = StepTrainer()
    loss = soft_loss(base="none")
    seen = record_loss_inputs(loss)
    generic.patch(
        trainer, loss, loss_method="compute_loss", ids_from="train_step", optimizer=trainer.optimizer, cache=cache
    )
    x, ids = torch.randn(4, IMG_DIM), (6, 1, 30, 12)
    img, txt = trainer.train_step(x, ids)
    assert seen[0]["ids"].tolist() == list(ids)
    t_img, t_txt = teacher_sims(cache, ids)
    expected = (img - txt).pow(2).sum() + loss(
        img, txt, image_ids=torch.tensor(ids) // 5, teacher=TeacherSimilarities(t_img, t_txt)
    )
    assert torch.allclose(trainer.last, expected)
    assert trainer._softalign_patch.ids is None  # cleared after the step
    trainer.compute_loss(img, txt)  # outside a step: original, the loss is not called
    assert len(seen) == 2  # one for the step, one for the expected value above
    with pytest.raises(TypeError, match="has no argument 'ids'"):
        generic.patch(StepTrainer(), loss, loss_method="compute_loss", ids_from="compute_loss", cache=cache)


def assert_same_loss_state(resumed, whole, steps=4):
    """A resumed SoftAlignLoss equals the uninterrupted one: its tensors, its calibration and step counter exactly,
    its last gradient shares (floats in the JSON record) to rounding."""
    import pytest

    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        if not name.endswith("_extra_state"):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert resumed.calibration == whole.calibration and resumed._steps == whole._steps == steps
    if whole.gradient_shares is not None:
        assert resumed.gradient_shares == pytest.approx(whole.gradient_shares, rel=1e-4, abs=1e-6)
