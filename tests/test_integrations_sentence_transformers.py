"""sentence-transformers for real: SoftAlignSTLoss and RetrievalEvaluator in a SentenceTransformerTrainer.

The task is text-text retrieval, the natural sentence-transformers case: each anchor sentence (the "image side")
has two paraphrases (the captions). The model is the packaged all-MiniLM-L6-v2; the teacher cache holds MiniLM's
embeddings of the anchors (image table) and of the paraphrases (text table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

from softalign.eval import RetrievalEvaluator  # noqa: E402
from softalign.integrations.sentence_transformers import SoftAlignSTLoss  # noqa: E402
from softalign.losses import SoftAlignLoss  # noqa: E402
from softalign.teachers import TeacherCache  # noqa: E402
from softalign.teachers.importers import import_npy  # noqa: E402
from softalign.teachers.packaged import offline_minilm_path  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["car", "cat"]


def _pairs():
    anchors, captions, c2i = [], [], []
    for colour in COLOURS:
        for thing in THINGS:
            anchors.append(f"a {colour} {thing}")
            for cap in (f"the {thing} is {colour}", f"a {thing} coloured {colour}"):
                captions.append(cap)
                c2i.append(len(anchors) - 1)
    return anchors, captions, c2i


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformer(offline_minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def st_cache(minilm, tmp_path_factory):
    anchors, captions, c2i = _pairs()
    with torch.no_grad():
        a = minilm.encode(anchors, convert_to_numpy=True)
        c = minilm.encode(captions, convert_to_numpy=True)
    out = tmp_path_factory.mktemp("st_cache") / "cache"
    import_npy(
        out,
        image_features=a,
        caption_to_image=c2i,
        text_features=c,
        image_teacher_name="minilm-anchors",
        text_teacher_name="minilm",
        progress=False,
    )
    return TeacherCache.load(out)


def _dataset():
    from datasets import Dataset

    anchors, captions, c2i = _pairs()
    return Dataset.from_dict(
        {"anchor": [anchors[i] for i in c2i], "caption": captions, "label": list(range(len(captions)))}
    )


def test_retrieval_evaluator_is_a_sentence_transformers_evaluator(minilm):
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

    anchors, captions, c2i = _pairs()
    ev = RetrievalEvaluator(anchors, captions, c2i, name="para")
    assert isinstance(ev, BaseEvaluator)
    metrics = ev(minilm)
    assert ev.primary_metric == "para_rsum" and metrics["para_rsum"] > 0
    # the metrics reached the model card, as sentence-transformers' own evaluators do
    assert minilm.model_card_data.eval_results_dict[ev]["para_rsum"] == metrics["para_rsum"]


def test_adapter_returns_weighted_terms_that_sum_to_the_loss(minilm, st_cache):
    loss = SoftAlignLoss(base="infonce", cache=st_cache, embed_dim=384, diagnostics_every=0)
    adapter = SoftAlignSTLoss(minilm, loss)
    anchors, captions, c2i = _pairs()
    ids = torch.tensor([0, 1, 4, 5, 9, 13])
    feats = [minilm.tokenize([anchors[c2i[i]] for i in ids]), minilm.tokenize([captions[i] for i in ids])]
    torch.manual_seed(0)
    parts = adapter(feats, ids)
    assert set(parts) == {"base", "csa", "usa"}
    with torch.no_grad():
        a = minilm(minilm.tokenize([anchors[c2i[i]] for i in ids]))["sentence_embedding"]
        c = minilm(minilm.tokenize([captions[i] for i in ids]))["sentence_embedding"]
    ref = loss(a, c, ids=ids, return_parts=True)
    torch.testing.assert_close(torch.stack(list(parts.values())).sum(), ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["csa"], loss.alpha * ref["csa"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["usa"], loss.beta * ref["usa"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="two input columns"):
        adapter(feats[:1], ids)
    with pytest.raises(ValueError, match="'label' column"):
        adapter(feats, None)
    assert "huang2024cusa" in adapter.citation and adapter.get_config_dict()["base"] == "infonce"


def test_sentence_transformer_trainer_runs_two_steps_with_the_loss_and_the_evaluator(tmp_path, st_cache):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = SentenceTransformer(offline_minilm_path(), device="cpu")  # a fresh copy: it is trained here
    loss = SoftAlignSTLoss(model, SoftAlignLoss(base="infonce", cache=st_cache, embed_dim=384, diagnostics_every=0))
    anchors, captions, c2i = _pairs()
    ev = RetrievalEvaluator(anchors, captions, c2i, name="para")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
    )
    loss_params = [p for p in loss.loss.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in loss_params]
    assert len(loss_params) >= 6  # USA's two heads (LayerNorm + Linear each) and the temperatures
    word0 = next(model.parameters()).detach().clone()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=_dataset(), loss=loss, evaluator=ev)
    trainer.train()
    # the loss's heads and temperatures are in the trainer's optimizer, once each, and were trained
    in_opt = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    ids_in_opt = [id(p) for p in in_opt]
    for p, p0 in zip(loss_params, before):
        assert ids_in_opt.count(id(p)) == 1 and not torch.equal(p.detach(), p0)
    assert not torch.equal(next(model.parameters()).detach(), word0)
    logs = trainer.state.log_history
    train_logs = [r for r in logs if "loss" in r and "eval_loss" not in r]
    assert len(train_logs) == 2 and all({"base", "csa", "usa"} <= set(r) for r in train_logs)
    for r in train_logs:  # the logged total is the sum of the logged terms: none counted twice
        assert r["loss"] == pytest.approx(r["base"] + r["csa"] + r["usa"], rel=1e-3, abs=1e-4)
    evals = [r for r in logs if "eval_para_rsum" in r]
    assert evals and np.isfinite(evals[-1]["eval_para_rsum"])
    assert loss.loss.calibration is not None and loss.loss.calibration["batch_size"] == 8


def _st_run(tmp_path, st_cache, out, stop_at=None, resume=False, callback=True, seed=0):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    torch.manual_seed(seed)  # the loss's USA heads start from this seed's random values
    model = SentenceTransformer(offline_minilm_path(), device="cpu")
    loss = SoftAlignSTLoss(model, SoftAlignLoss(base="infonce", cache=st_cache, embed_dim=384, diagnostics_every=1))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
    )

    class Stop(TrainerCallback):  # a run killed right after its step-2 checkpoint
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    callbacks = ([loss.checkpoint_callback] if callback else []) + [Stop()]
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=_dataset(), loss=loss, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
    return trainer, loss.loss


def test_resume_from_checkpoint_restores_the_loss_as_an_uninterrupted_run(tmp_path, st_cache):
    from softalign.integrations.sentence_transformers import LOSS_FILE

    _, whole = _st_run(tmp_path, st_cache, tmp_path / "whole")
    assert (tmp_path / "whole" / "checkpoint-2" / LOSS_FILE).is_file()
    first, _ = _st_run(tmp_path, st_cache, tmp_path / "split", stop_at=2)
    assert first.state.global_step == 2
    # resumed with a loss built from another seed: its heads, temperatures, calibration and step counter come back
    trainer, resumed = _st_run(tmp_path, st_cache, tmp_path / "split", resume=True, seed=1)
    assert trainer.state.global_step == 4
    _assert_same_loss_state(resumed, whole)
    # a checkpoint without the loss's file is refused on resume, naming the file
    (tmp_path / "split" / "checkpoint-2" / LOSS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-2/{LOSS_FILE} is missing"):
        _st_run(tmp_path, st_cache, tmp_path / "split", resume=True)


def test_a_trainer_without_the_checkpoint_callback_warns(tmp_path, st_cache):
    with pytest.warns(UserWarning, match=r"built without callbacks=\[loss.checkpoint_callback\]"):
        _st_run(tmp_path, st_cache, tmp_path / "nocb", stop_at=2, callback=False)


def test_the_docs_block_trains_and_checkpoints_without_deprecation_warnings(tmp_path, st_cache):
    """docs/hosts.md's sentence-transformers block, run as printed on the installed sentence-transformers: no
    deprecated call, and its trainer carries the loss's checkpoint callback."""
    import warnings

    from softalign.integrations.sentence_transformers import LOSS_FILE
    from tests.doc_blocks import doc_block

    snippet = doc_block("hosts.md", "sentence-transformers")
    model = SentenceTransformer(offline_minilm_path(), device="cpu")
    anchors, captions, c2i = _pairs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = snippet["make_st_trainer"](
            model,
            _dataset(),
            anchors,
            captions,
            c2i,
            str(tmp_path / "out"),
            cache_dir=str(st_cache.path),
            max_steps=2,
            save_steps=2,
            per_device_train_batch_size=8,
            use_cpu=True,
            dataloader_drop_last=True,
        )
        trainer.train()
    from_block = [
        w
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and w.filename.startswith("docs/hosts.md")
    ]
    assert not from_block, [str(w.message) for w in from_block]
    assert (tmp_path / "out" / "checkpoint-2" / LOSS_FILE).is_file()


def _assert_same_loss_state(resumed, whole):
    from tests.test_integrations_common import assert_same_loss_state

    assert_same_loss_state(resumed, whole)
