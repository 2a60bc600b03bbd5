"""patch_sentence_transformers: an unmodified script's loss names resolve to fastcache's classes, and the undo
restores sentence-transformers' own."""

import subprocess
import sys
import textwrap
from pathlib import Path

import sentence_transformers.cross_encoder.losses as st_ce_losses
import sentence_transformers.multi_vector_encoder.losses as st_mv_losses
import sentence_transformers.sentence_transformer.losses as st_losses
import sentence_transformers.sparse_encoder.losses as st_sparse_losses
import torch

import fastcache
from fastcache import losses
from fastcache.cross_encoder import losses as ce_losses
from fastcache.multi_vector_encoder import losses as mv_losses
from fastcache.sparse_encoder import losses as sparse_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from ranking_table import build_tiny_cross_encoder, text_lists  # noqa: E402

MODULES = [("sentence_transformers.sentence_transformer.losses", st_losses, losses),
           ("sentence_transformers.cross_encoder.losses", st_ce_losses, ce_losses),
           ("sentence_transformers.multi_vector_encoder.losses", st_mv_losses, mv_losses),
           ("sentence_transformers.sparse_encoder.losses", st_sparse_losses, sparse_losses)]


def test_patch_and_undo():
    originals = {(upstream, name): getattr(upstream, name) for _, upstream, ours in MODULES for name in ours.__all__}
    try:
        patched = fastcache.patch_sentence_transformers()
        assert sorted(patched) == sorted(f"{path}.{name}" for path, _, ours in MODULES for name in ours.__all__)
        fastcache.patch_sentence_transformers()  # twice is harmless: the undo still restores the originals
        for _, upstream, ours in MODULES:
            for name in ours.__all__:
                assert getattr(upstream, name) is getattr(ours, name)
                assert issubclass(getattr(upstream, name), originals[upstream, name])
    finally:
        fastcache.unpatch_sentence_transformers()
    for (upstream, name), original in originals.items():
        assert getattr(upstream, name) is original


def test_cross_encoder_losses_patched_train_and_undo(tmp_path):
    """After the patch, a CrossEncoder loss built from sentence-transformers' module is fastcache's and trains;
    after the undo the same name builds upstream's class again."""
    model = build_tiny_cross_encoder(tmp_path / "ce", seed=0)
    inputs, labels = text_lists(2, 3, seed=2)
    upstream_lambda = st_ce_losses.LambdaLoss
    try:
        fastcache.patch_sentence_transformers()
        from sentence_transformers.cross_encoder import losses as script_losses  # as an unchanged script does

        loss = script_losses.LambdaLoss(model, weighting_scheme=script_losses.NDCGLoss2PPScheme())
        assert type(loss) is ce_losses.LambdaLoss and type(loss.weighting_scheme) is ce_losses.NDCGLoss2PPScheme
        mnrl = script_losses.CachedMultipleNegativesRankingLoss(model, num_negatives=None, mini_batch_size=2)
        assert type(mnrl) is ce_losses.CachedMultipleNegativesRankingLoss
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        value = loss(inputs, labels)
        value.backward()
        optimizer.step()
        assert torch.isfinite(value) and float(value) > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    finally:
        fastcache.unpatch_sentence_transformers()
    assert st_ce_losses.LambdaLoss is upstream_lambda
    assert type(st_ce_losses.LambdaLoss(model)) is upstream_lambda


def test_unmodified_script_gets_fastcache_losses(tmp_path):
    """A script written for sentence-transformers, run after the patch, builds fastcache's loss."""
    script = textwrap.dedent("""
        import os, sys
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.path.insert(0, sys.argv[1])
        import fastcache
        fastcache.patch_sentence_transformers()
        # --- the user's unchanged script from here on ---
        from pathlib import Path
        from sentence_transformers import losses
        from conftest import build_tiny_bert
        model = build_tiny_bert(Path(sys.argv[2]), seed=0)
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
        features = [model.preprocess(["a cat", "the dog", "sun car"]), model.preprocess(["cat", "dog", "car"])]
        value = loss(features, None)
        value.backward()
        print(type(loss).__module__, float(value))
    """)
    path = tmp_path / "train.py"
    path.write_text(script)
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, str(path), tests_dir, str(tmp_path / "model")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, value = result.stdout.split()[-2:]
    assert module == "fastcache.losses.multiple_negatives_ranking"
    assert float(value) > 0
