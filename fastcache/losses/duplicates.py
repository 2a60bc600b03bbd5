"""In-batch duplicate detection from the inputs: the id of a candidate is a hash of its token ids.

Upstream cannot find duplicates after embedding (dropout makes identical texts differ) and recommends a no-duplicates
batch sampler. Two candidates with the same non-padding token ids are the same text: with ``mask_duplicates=True``
a candidate identical to a row's positive is not used as that row's negative (fastcache's op, ``doc_ids``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor


def _row_ids(features: dict[str, Tensor]) -> Tensor:
    """One int64 per row: an 8-byte BLAKE2b digest of the row's non-padding token ids (the same in every process)."""
    if "input_ids" not in features or features["input_ids"].dim() != 2:
        raise ValueError("mask_duplicates needs padded input_ids [batch, tokens] in the features (a StaticEmbedding "
                         "model's flattened inputs cannot be compared row by row)")
    input_ids = features["input_ids"].detach().to("cpu", torch.int64)
    mask = features.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.detach().to("cpu").bool()
    ids = [int.from_bytes(hashlib.blake2b(row[keep].numpy().tobytes(), digest_size=8).digest(), "little", signed=True)
           for row, keep in zip(input_ids, mask)]
    return torch.tensor(ids, dtype=torch.int64)


def candidate_ids(candidate_features: list[dict[str, Tensor]], gathered: bool, device: torch.device) -> Tensor:
    """Ids of the candidates laid out as fastcache's op takes them: [C, P] (P = rows, times the world size when
    ``gathered``: every rank's rows in rank order, as all_gather lays them out)."""
    ids = torch.stack([_row_ids(features) for features in candidate_features]).to(device)
    if gathered:
        parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, ids)
        ids = torch.cat(parts, dim=1)
    return ids
