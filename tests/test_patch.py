"""patch_sentence_transformers: an unmodified script's loss names resolve to fastcache's classes, and the undo
restores sentence-transformers' own."""

import subprocess
import sys
import textwrap

import sentence_transformers.sentence_transformer.losses as st_losses

import fastcache
from fastcache import losses


def test_patch_and_undo():
    originals = {name: getattr(st_losses, name) for name in losses.__all__}
    try:
        patched = fastcache.patch_sentence_transformers()
        assert sorted(patched) == sorted(losses.__all__)
        fastcache.patch_sentence_transformers()  # twice is harmless: the undo still restores the originals
        for name in losses.__all__:
            assert getattr(st_losses, name) is getattr(losses, name)
            assert issubclass(getattr(st_losses, name), originals[name])
    finally:
        fastcache.unpatch_sentence_transformers()
    for name in losses.__all__:
        assert getattr(st_losses, name) is originals[name]


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
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parent)
    result = subprocess.run([sys.executable, str(path), tests_dir, str(tmp_path / "model")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, value = result.stdout.split()[-2:]
    assert module == "fastcache.losses.multiple_negatives_ranking"
    assert float(value) > 0
