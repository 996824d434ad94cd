"""The rules for index data: the offsets of a ragged q or k/v, the lengths and page ids of a paged cache.

They are untrusted (DESIGN.md, Safety). `attnc.reference` checks them on the host and raises; the kernels check
what they read on the device, clamp every address derived from them into its tensor, poison the rows that bad
data reaches with NaN and record the violation in a device error buffer (attnc/backends/device_errors.py), which
`attnc.check_errors()` and validate mode turn into the same CallError the reference raises. This module is the
vocabulary both sides share: what a violation is, how the device records one, and its message.

    offsets  start at 0, never decrease and end at the packed length (T for q, TK for k/v)
    lengths  0 <= kv_len[b] <= MAXP * PAGE
    page ids 0 <= block_table[b, e] < PAGES for every entry e that holds one of the sequence's keys
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Validate mode for every kernel call of the process (ATTNC_VALIDATE=1), read once: not a per-call cost.
VALIDATE_ALL = os.environ.get("ATTNC_VALIDATE", "0") not in ("", "0")

# What a violation is (the `kind` slot of a record).
PAGE_ID, LENGTH, OFFSETS_START, OFFSETS_DECREASE, OFFSETS_END = 1, 2, 3, 4, 5

# A record in the device error buffer: int64 slots. COUNT counts the programs that found a violation; the first
# to count keeps its details in the other slots. SITE says which kernel (backends/device_errors.register_site),
# TENSOR which of its spec's inputs (the index in spec.inputs).
COUNT, SITE, TENSOR, KIND, SEQ, INDEX, VALUE, LIMIT, OTHER = range(9)
SLOTS = 16


@dataclass(frozen=True)
class Violation:
    """One bad value of an index tensor: `tensor`, of sequence `seq`, at `index` (the offset's or the block-table
    entry's), with `limit` the bound it broke (T or TK, PAGES, MAXP * PAGE) and `other` what the message needs
    besides: the previous offset of a decrease, a sequence's key count, MAXP, or for the end of the offsets 0
    when they are q's (ending at T) and 1 when they are k's and v's (ending at TK)."""

    kind: int
    tensor: str
    seq: int
    index: int
    value: int
    limit: int
    other: int = 0

    def message(self) -> str:
        name, v = self.tensor, self.value
        if self.kind == OFFSETS_START:
            return f"{name}: the offsets must start at 0, but {name}[0] = {v}"
        if self.kind == OFFSETS_DECREASE:
            return (f"{name}: the offsets must never decrease, but {name}[{self.index}] = {v} < "
                    f"{name}[{self.index - 1}] = {self.other}")
        if self.kind == OFFSETS_END:
            return (f"{name}: the offsets must end at {'TK' if self.other else 'T'} = {self.limit}, the number of packed tokens, but "
                    f"{name}[{self.index}] = {v}")
        if self.kind == LENGTH:
            page = self.limit // self.other if self.other else 0
            return (f"{name}: {name}[{self.seq}] = {v}, but a sequence holds 0 to MAXP * PAGE = {self.limit} keys "
                    f"(its {self.other} block-table entries of {page} slots)")
        if self.kind == PAGE_ID:
            return (f"{name}: {name}[{self.seq}, {self.index}] = {v} is not a page id: k and v have PAGES = "
                    f"{self.limit} pages (sequence {self.seq} has {self.other} keys, so entry {self.index} holds "
                    f"some of them)")
        raise ValueError(f"unknown index-data violation kind {self.kind}")
