"""The kernels' option codes agree across languages: fastcache/kernel_codes.py (the Python definition, which the
op's kernel_params and the Triton kernels read) and its C++ twin, csrc/contrastive_params.h's enums."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastcache.kernel_codes import Hardness, Kind, MarginStrategy

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "contrastive_params.h"
def _camel(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


# each Python enum, its C++ name, and the C++ spelling of a member (kQueryToDoc for QUERY_TO_DOC, ...)
TWINS = [(Kind, "Kind", _camel),
         (Hardness, "Hardness", lambda name: "kNoHardness" if name == "NONE" else _camel(name)),
         (MarginStrategy, "MarginStrategy", lambda name: _camel(f"{name}_MARGIN"))]


def _cpp_enum(name: str) -> dict[str, int]:
    """``enum <name> : int { kA = 0, kB = 1 };`` in the header, as {"kA": 0, "kB": 1}."""
    match = re.search(rf"enum {name} : int \{{([^}}]*)\}};", HEADER.read_text())
    assert match, f"enum {name} not found in {HEADER}"
    return {k.strip(): int(v) for k, v in (item.split("=") for item in match.group(1).split(","))}


@pytest.mark.parametrize(("enum", "cpp_name", "spelling"), TWINS, ids=[t[1] for t in TWINS])
def test_python_and_cpp_codes_agree(enum, cpp_name, spelling):
    assert _cpp_enum(cpp_name) == {spelling(member.name): member.value for member in enum}


def test_the_triton_constants_are_the_python_codes():
    triton_contrastive = pytest.importorskip("fastcache.triton.contrastive")
    for member in Kind:
        assert getattr(triton_contrastive, member.name).value == member.value
    for member in Hardness:
        if member is not Hardness.NONE:
            assert getattr(triton_contrastive, member.name).value == member.value
