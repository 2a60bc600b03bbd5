"""Learning-to-rank benchmarks (CPU): fastcache's fused ranking ops against sentence-transformers' cross-encoder loss
maths, and a cross-encoder training step with and without gradient caching.

1. Loss maths on precomputed scores: Q=64 queries, n in {32, 128, 1024, 4096} documents each, graded labels 0..4,
   forward + backward. sentence-transformers' classes run with a stand-in model (:class:`FixedScores`: the score
   of a pair is a fixed leaf tensor's entry), so only their loss maths is timed; fastcache runs its op on the
   same [Q, n] scores (mini_batch_size=-1: one call of the stand-in, whose gather and scatter cost little). Time (min and median of the repeats, interleaved; one run at n >= 1024) and, for
   LambdaLoss and ListMLELoss, peak memory beyond the inputs (each case once in a fresh process,
   fastcache.app.harness). sentence-transformers' pairwise losses at n=4096 would need
   ~60 GB ([Q, n, n] float32 tensors): skipped.
2. Training step at n=256: a tiny CrossEncoder (BERT, hidden 128, 2 layers, built offline), 4 queries x 256
   documents, LambdaLoss (NDCGLoss2++) with mini_batch_size=32: sentence-transformers (every pair's activations
   alive until the backward) against fastcache with cache_gradients=True (one mini-batch alive); peak memory and
   time of loss + backward, and the largest parameter-gradient difference.

    python bench/ranking_table.py [--quick] [--repeats R] [--no-memory] [--no-train] [--sizes N ...]
                                  [--losses NAME ...] [--out bench/results/ranking_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, RunOutput, peak_memory, time_cases  # noqa: E402

from fastcache.app.benchmark import machine_info  # noqa: E402

HERE = Path(__file__).resolve()
LOSSES = ("LambdaLoss", "RankNetLoss", "ListMLELoss", "PListMLELoss", "ListNetLoss")
MEMORY_LOSSES = ("LambdaLoss", "ListMLELoss")  # peak memory measured (a fresh process per case) for these
PAIRWISE = ("LambdaLoss", "RankNetLoss")
OP_SIZES = (32, 128, 1024, 4096)
UPSTREAM_PAIRWISE_MAX_N = 1024  # beyond: [Q, n, n] float32 tensors of several GB each


class FixedScores(torch.nn.Module):
    """A stand-in CrossEncoder whose score of pair (query, document) is ``scores[int(document)]``: the documents
    are the indices of a flat leaf tensor, so a loss class runs its own maths on precomputed scores."""

    num_labels = 1

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = torch.nn.Parameter(scores.reshape(-1).clone())
        self.device = scores.device

    def preprocess(self, pairs, prompt=None, task=None):
        return {"index": torch.tensor([int(document) for _, document in pairs], dtype=torch.long)}

    def forward(self, features):
        return {"scores": self.scores[features["index"]][:, None]}


def listwise_batch(scores: torch.Tensor, labels: torch.Tensor, lengths: list[int]):
    """(inputs, labels) in sentence-transformers' listwise format for a FixedScores model over ``scores`` [Q, n]:
    query q has its first lengths[q] documents."""
    n = scores.size(1)
    docs = [[str(q * n + j) for j in range(length)] for q, length in enumerate(lengths)]
    return [[f"q{q}" for q in range(len(lengths))], docs], [labels[q, :length] for q, length in enumerate(lengths)]


def make_scores(Q: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Q, n, generator=g), torch.randint(0, 5, (Q, n), generator=g).float()


def loss_class(name: str, impl: str):
    if impl == "fastcache":
        from fastcache.cross_encoder import losses
    else:
        from sentence_transformers.cross_encoder import losses
    return getattr(losses, name)


def op_case(loss: str = "LambdaLoss", impl: str = "fastcache", Q: int = 64, n: int = 128) -> Case:
    """Forward + backward of one loss on fixed [Q, n] scores (all lists full)."""
    scores, labels = make_scores(Q, n)
    model = FixedScores(scores)
    inputs, label_list = listwise_batch(scores, labels, [n] * Q)
    criterion = loss_class(loss, impl)(model, mini_batch_size=-1)  # one stand-in call: only the loss maths costs

    def run():
        value = criterion(inputs, label_list)
        value.backward()
        return RunOutput(loss=float(value.detach()), grads=[model.scores.grad])

    def reset():
        model.scores.grad = None

    return Case(f"{loss} {impl} n={n}", run, inputs=[model.scores], reset=reset,
                info={"loss": loss, "impl": impl, "Q": Q, "n": n})


_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_tiny_cross_encoder(folder: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A random BERT CrossEncoder (num_labels=1) with a letter vocabulary, written to ``folder`` and loaded back,
    offline. Dropout stays on (train mode) unless the caller switches it off."""
    from sentence_transformers.cross_encoder import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _VOCAB + [f"##{c}" for c in _VOCAB[5:]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=128,
                        num_labels=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return CrossEncoder(str(folder), device="cpu")


def text_lists(Q: int, n: int, seed: int = 0, words: int = 6):
    """Q queries with n documents each (random letter words) and graded labels 0..3."""
    g = torch.Generator().manual_seed(seed)

    def text(length):
        letters = torch.randint(0, 26, (length, 5), generator=g)
        return " ".join("".join(chr(97 + int(c)) for c in word) for word in letters)

    queries = [text(3) for _ in range(Q)]
    docs = [[text(words) for _ in range(n)] for _ in range(Q)]
    labels = [torch.randint(0, 4, (n,), generator=g).float() for _ in range(Q)]
    return [queries, docs], labels


def train_case(cached: bool = False, Q: int = 4, n: int = 256, mini_batch_size: int = 32,
               hidden_size: int = 128) -> Case:
    """Loss + backward of LambdaLoss on a tiny CrossEncoder: sentence-transformers (cached=False) or fastcache with
    cache_gradients=True."""
    folder = Path(tempfile.mkdtemp(prefix="fastcache_ranking_bench_"))
    model = build_tiny_cross_encoder(folder, hidden_size=hidden_size)
    model.train()
    inputs, labels = text_lists(Q, n)
    if cached:
        from fastcache.cross_encoder.losses import LambdaLoss
        criterion = LambdaLoss(model, mini_batch_size=mini_batch_size, cache_gradients=True)
    else:
        from sentence_transformers.cross_encoder.losses import LambdaLoss
        criterion = LambdaLoss(model, mini_batch_size=mini_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(1)  # the same dropout masks in both
        value = criterion(inputs, labels)
        value.backward()
        return RunOutput(loss=float(value.detach()), grads=[p.grad for p in params])

    def reset():
        for p in params:
            p.grad = None

    return Case(f"train n={n} {'fastcache cached' if cached else 'sentence-transformers'}", run, inputs=params,
                reset=reset, info={"cached": cached, "Q": Q, "n": n, "mini_batch_size": mini_batch_size})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, no claims)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(OP_SIZES), help="list lengths n")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "ranking_cpu.json"))
    args = parser.parse_args()
    Q, sizes = (4, (8, 16)) if args.quick else (64, tuple(args.sizes))
    train_n, train_q = (16, 2) if args.quick else (256, 4)
    report = {"machine": machine_info(), "command": " ".join(["python"] + sys.argv), "ops": [], "train": []}
    rows = []
    for n in sizes:
        cases = []
        for loss in args.losses:
            cases.append(op_case(loss, "fastcache", Q, n))
            if not (loss in PAIRWISE and n > UPSTREAM_PAIRWISE_MAX_N):
                cases.append(op_case(loss, "sentence-transformers", Q, n))
        repeats = 1 if n >= 1024 else args.repeats
        results = time_cases(cases, warmup=0 if n >= 1024 else 1, repeats=repeats)
        memory = [{} for _ in cases]
        if not args.no_memory:  # each case once in a fresh process, after a tiny warm-up case
            memory = [_peak("op_case", case.info, {**case.info, "Q": 2, "n": 4})
                      if case.info["loss"] in MEMORY_LOSSES else {} for case in cases]
        for case, (timing, out), mem in zip(cases, results, memory):
            entry = {**case.info, "min_s": timing.min_s, "median_s": timing.median_s, "loss_value": out.loss,
                     "peak_beyond_inputs_mib": mem.get("peak_beyond_inputs_mib")}
            report["ops"].append(entry)
            rows.append(entry)
        del cases, results
    print("| loss | n | fastcache s | sentence-transformers s | speed-up | peak MiB fastcache / ST | same loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for n in sizes:
        for loss in args.losses:
            ours = next(r for r in rows if r["loss"] == loss and r["n"] == n and r["impl"] == "fastcache")
            theirs = next((r for r in rows if r["loss"] == loss and r["n"] == n and r["impl"] != "fastcache"), None)
            if theirs is None:
                print(f"| {loss} | {n} | {ours['min_s']:.4f} | skipped (~60 GB) | | "
                      f"{_mib(ours)} / - | |")
                continue
            same = abs(ours["loss_value"] - theirs["loss_value"]) <= 1e-4 * max(1.0, abs(theirs["loss_value"]))
            verdict = "yes" if same else "DISAGREE" if math.isfinite(theirs["loss_value"]) else \
                f"upstream {theirs['loss_value']}"
            print(f"| {loss} | {n} | {ours['min_s']:.4f} | {theirs['min_s']:.4f} | "
                  f"{theirs['min_s'] / ours['min_s']:.1f}x | {_mib(ours)} / {_mib(theirs)} | {verdict} |")
    if args.no_train:
        _write(report, args.out)
        return
    train_cases = [train_case(False, train_q, train_n), train_case(True, train_q, train_n)]
    results = time_cases(train_cases, warmup=1, repeats=1)
    grads = [out.grads for _, out in results]
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(*grads))
    grad_scale = max(float(a.abs().max()) for a in grads[0])
    for case, (timing, out) in zip(train_cases, results):
        mem = {} if args.no_memory else _peak("train_case", case.info, {**case.info, "Q": 2, "n": 8})
        entry = {**case.info, "min_s": timing.min_s, "loss_value": out.loss,
                 "peak_beyond_inputs_mib": mem.get("peak_beyond_inputs_mib"),
                 "peak_beyond_inputs_and_grads_mib": mem.get("peak_beyond_inputs_and_grads_mib")}
        report["train"].append(entry)
    report["train_max_grad_diff"] = grad_diff
    report["train_max_grad"] = grad_scale
    st, ours = report["train"]
    print(f"\n| training step, LambdaLoss, {train_q} queries x {train_n} docs, mini_batch_size 32 | seconds | "
          "peak MiB beyond params | loss |")
    print("| --- | ---: | ---: | ---: |")
    for name, entry in (("sentence-transformers", st), ("fastcache cache_gradients=True", ours)):
        print(f"| {name} | {entry['min_s']:.2f} | {_mib(entry)} | {entry['loss_value']:.6f} |")
    if st["peak_beyond_inputs_mib"] and ours["peak_beyond_inputs_mib"]:
        print(f"peak memory ratio ST / fastcache: {st['peak_beyond_inputs_mib'] / ours['peak_beyond_inputs_mib']:.1f}x;"
              f" largest parameter-gradient difference {grad_diff:.2e} (largest gradient {grad_scale:.2e})")
    _write(report, args.out)


def _write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def _peak(factory: str, kwargs: dict, warmup: dict) -> dict:
    return peak_memory(HERE, factory, kwargs, warmup_kwargs=warmup, timeout=1800)


def _mib(entry) -> str:
    value = entry.get("peak_beyond_inputs_mib")
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
