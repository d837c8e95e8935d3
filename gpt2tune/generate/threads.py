"""Intra-op threads for decoding's small work.

A decoding step of a few rows is a handful of big matrix products and many small ops (norms,
attention over one query, residual adds, the logits' processors and the pick of the next token).
The small ops gain nothing from a second thread and wait at its barriers, which on a loaded machine
means waiting for a descheduled partner. `one_thread()` runs a block on one thread;
`generate.fast.FastRunner` lends the threads back to its big products when that is measured to be
faster, and `generate.decode.Decoder` picks the next tokens of a few rows on one thread
(`small(logits)`).
"""

from __future__ import annotations

import contextlib

import torch

SMALL = 1 << 19  # logits of at most this many elements (8 rows of GPT-2's vocabulary) are small work


@contextlib.contextmanager
def one_thread():
    """Run the block on one intra-op thread (one-row steps); yield the thread count it had. The
    small ops of a step (attention, norms, the bf16 / int8 kernels) gain little from a second
    thread and wait at OpenMP barriers, and on a loaded machine every barrier waits for a
    descheduled partner (SDPA: 30 us alone, 5.8 ms per call at load 2 on 2 cores). One thread
    against two, paired runs on the 2-core EPYC: fp32 34.5 vs 30.4 tok/s and int8 65 vs 56 at load
    1.3; 2.2x (fp32), 3.1x (bf16), 3.2x (int8) at load 3.3. Only the big products (every weight
    format) get the threads back, when `generate.fast.Lending` finds it faster. Batches keep every thread for
    their GEMMs."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if n > 1:
            torch.set_num_threads(n)


def small(logits: torch.Tensor):
    """`one_thread()` for work on `logits` [rows, vocab] of at most `SMALL` elements, else nothing."""
    return one_thread() if logits.numel() <= SMALL else contextlib.nullcontext()
