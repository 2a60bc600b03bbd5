"""The ranking cases of the GPU benchmark (bench/gpu_bench.py runs them in its ranking groups).

LambdaLoss (NDCGLoss2++, mu 10, the defaults otherwise), ListNet and ListMLE (input order) on precomputed logits:
Q = 64 queries × n documents (all lists full, graded labels 0..4, random normal logits), forward + backward,
float32, n in RANKING_SIZES. Per loss, three implementations of the same value:

  <loss>_cuda   ``fastcache.ops.ranking.<op>(logits, labels, backend="cuda")``: the CUDA kernels (csrc/cuda/ranking.cu);
  <loss>_torch  the same op with ``backend="torch"``: the pure-PyTorch fallback (LambdaLoss in blocks of ranks within
                the default 256 MiB memory budget);
  <loss>_st     sentence-transformers' class (LambdaLoss, ListNetLoss, ListMLELoss; mini_batch_size=-1) on a stand-in
                model whose scores are the logits (bench/ranking_table.FixedScores, its index tensor precomputed), so
                what is timed is the class's own work: its pair list, the padded matrices and its loss maths.
                LambdaLoss builds [Q, n, n] float32 tensors: where ~16 of them do not fit in free GPU memory the case
                is recorded as skipped with the estimate.

In a dry run (no GPU) the cuda cases run the torch backend, on Q = 4 queries of 16 documents.
"""

from __future__ import annotations

Q = 64
RANKING_SIZES = (1024, 4096, 128)  # most important first: n = 1024 is the target size
DRY_RANKING = (4, 16)  # (Q, n) of a dry run
LOSSES = {"lambdaloss": ("lambda_loss", "LambdaLoss"), "listnet": ("listnet", "ListNetLoss"),
          "listmle": ("listmle", "ListMLELoss")}  # case prefix -> (fastcache op, sentence-transformers class)
IMPLEMENTATIONS = {"cuda": "fastcache op, cuda backend", "torch": "fastcache op, torch backend",
                   "st": "sentence-transformers class on the precomputed logits"}
RANKING_CASES = {f"{loss}_{impl}": f"{classname}: {label}" for loss, (_, classname) in LOSSES.items()
                 for impl, label in IMPLEMENTATIONS.items()}
ST_LAMBDA_TEMPORARIES = 16  # [Q, n, n] float32 tensors alive at once in sentence-transformers' LambdaLoss (estimate)


def make_ranking_case(name: str, queries: int, n: int, device: str, dry_run: bool):
    """(run, reset, info) of RANKING_CASES case ``name`` on ``queries`` lists of ``n`` documents: ``run()`` does the
    forward and backward and returns (loss, grads)."""
    import torch

    loss_name, impl = name.rsplit("_", 1)
    op_name, classname = LOSSES[loss_name]
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(queries, n, generator=g)
    labels = torch.randint(0, 5, (queries, n), generator=g).float()
    info = {"ranking_loss": loss_name, "implementation": impl, "Q": queries, "n": n}

    if impl in ("cuda", "torch"):
        from fastcache.ops import ranking

        backend = "torch" if dry_run else impl
        info["backend"] = backend
        op = getattr(ranking, op_name)
        logits = scores.to(device).requires_grad_()
        labels = labels.to(device)

        def run_op():
            loss = op(logits, labels, backend=backend)
            loss.backward()
            return loss.detach(), (logits.grad,)

        def reset_op():
            logits.grad = None

        return run_op, reset_op, info

    if loss_name == "lambdaloss" and torch.cuda.is_available():
        need, free = ST_LAMBDA_TEMPORARIES * queries * n * n * 4, torch.cuda.mem_get_info()[0]
        info["estimated_bytes"] = need
        if need > 0.9 * free:
            raise MemoryError(f"skipped: ~{ST_LAMBDA_TEMPORARIES} [Q, n, n] float32 tensors need ~{need / 2**30:.0f} "
                              f"GiB, {free / 2**30:.0f} GiB free")
    from sentence_transformers.cross_encoder import losses
    from ranking_table import FixedScores, listwise_batch

    class PrecomputedScores(FixedScores):
        """FixedScores whose preprocessing returns the precomputed index of every pair, in order (one call)."""

        def preprocess(self, pairs, prompt=None, task=None):
            return {"index": self.index}

    model = PrecomputedScores(scores.to(device))
    model.index = torch.arange(queries * n, device=device)
    inputs, label_list = listwise_batch(scores, labels, [n] * queries)
    criterion = getattr(losses, classname)(model, mini_batch_size=-1)

    def run_st():
        loss = criterion(inputs, label_list)
        loss.backward()
        return loss.detach(), (model.scores.grad,)

    def reset_st():
        model.scores.grad = None

    return run_st, reset_st, info
