"""The option codes every compiled kernel takes, defined once for Python: the op's options encode them
(fastcache/ops/contrastive/options.py's kernel_params), the Triton kernels compare against them
(fastcache/triton/contrastive.py). Their C++ twin is csrc/contrastive_params.h (tests/native/test_kernel_codes.py
checks that the two agree). Imports nothing of fastcache.
"""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    """A similarity block's direction (its rows -> its columns), in the order of the op's DIRECTIONS."""
    QUERY_TO_DOC = 0
    QUERY_TO_QUERY = 1
    DOC_TO_QUERY = 2
    DOC_TO_DOC = 3


class Hardness(IntEnum):
    """Which query_to_doc negatives the hardness penalty applies to (NONE also when the strength is 0)."""
    NONE = 0
    IN_BATCH_NEGATIVES = 1
    HARD_NEGATIVES = 2
    ALL_NEGATIVES = 3


class MarginStrategy(IntEnum):
    """The guide's threshold: its positive similarity minus the margin (ABSOLUTE) or minus |positive|·margin."""
    ABSOLUTE = 0
    RELATIVE = 1
