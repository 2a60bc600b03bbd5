"""The application built on the fastcache library: the `fastcache` command (:mod:`fastcache.app.cli`; `python -m
fastcache` runs it), the training runs it drives (:mod:`~fastcache.app.train`, :mod:`~fastcache.app.train_reranker`),
their datasets (:mod:`~fastcache.app.data`) and output folders (:mod:`~fastcache.app.output_dir`), and the benchmark
harness shared by `fastcache bench` and the scripts in bench/ (:mod:`~fastcache.app.harness`,
:mod:`~fastcache.app.benchmark`). The library (fastcache.ops, fastcache.losses, fastcache.cross_encoder, ...) never
imports this package (tests/test_layering.py checks it), so ``import fastcache`` loads none of it.
"""
