"""Retrieval evaluation: cross-modal i2t/t2i (VSE++ definitions, COCO/Flickr30K protocols,
chunked), COCO 5K with ECCV Caption / CxC extended positives, two-stage re-ranking (TGDT), uni-modal i2i/t2t (pytorch-metric-learning), a
sentence-transformers-style evaluator and reports (JSON, markdown, recall@K PNG)."""

from __future__ import annotations

from softalign._lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_KS": "crossmodal",
    "RankResult": "crossmodal",
    "check_caption_to_image": "crossmodal",
    "cross_modal_ranks": "crossmodal",
    "cross_modal_recall": "recall",
    "metrics_from_ranks": "crossmodal",
    "recall_curve": "crossmodal",
    "RetrievalEvaluator": "evaluator",
    "coco5k_test_ids": "extended_positives",
    "extended_positive_metrics": "extended_positives",
    "faiss_recall_at_k": "faiss_recall",
    "encode_with_model": "evaluator",
    "PROTOCOLS": "protocols",
    "protocol_recall_curve": "protocols",
    "comparison_table": "report",
    "compare_runs": "report",
    "markdown_table": "report",
    "plot_recall_at_k": "report",
    "write_report": "report",
    "block_scorer_from_pairs": "rerank",
    "two_stage_ranks": "rerank",
    "two_stage_rerank": "rerank",
    "unimodal_retrieval": "unimodal",
    "uni_modal_metrics": "unimodal",
    "load_sts": "sts",
    "sts_metrics": "sts",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
