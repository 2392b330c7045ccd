"""Retrieval evaluation: cross-modal i2t/t2i (VSE++ definitions, COCO/Flickr30K protocols,
chunked), two-stage re-ranking (TGDT), uni-modal i2i/t2t (pytorch-metric-learning), a
sentence-transformers-style evaluator and reports (JSON, markdown, recall@K PNG)."""
from softalign.eval.crossmodal import (
    DEFAULT_KS,
    RankResult,
    check_caption_to_image,
    cross_modal_ranks,
    cross_modal_recall,
    metrics_from_ranks,
    recall_curve,
)
from softalign.eval.evaluator import RetrievalEvaluator, encode_with_model
from softalign.eval.protocols import PROTOCOLS, evaluate_coco, evaluate_protocol, fold_metrics
from softalign.eval.report import comparison_table, compare_runs, markdown_table, plot_recall_at_k, write_report
from softalign.eval.rerank import block_scorer_from_pairs, two_stage_ranks, two_stage_rerank
from softalign.eval.unimodal import text_similarity_correlation, unimodal_retrieval

__all__ = [
    "DEFAULT_KS",
    "PROTOCOLS",
    "RankResult",
    "RetrievalEvaluator",
    "block_scorer_from_pairs",
    "check_caption_to_image",
    "compare_runs",
    "comparison_table",
    "cross_modal_ranks",
    "cross_modal_recall",
    "encode_with_model",
    "evaluate_coco",
    "evaluate_protocol",
    "fold_metrics",
    "markdown_table",
    "metrics_from_ranks",
    "plot_recall_at_k",
    "recall_curve",
    "text_similarity_correlation",
    "two_stage_ranks",
    "two_stage_rerank",
    "unimodal_retrieval",
    "write_report",
]
