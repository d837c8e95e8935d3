"""Keep a conversation within a token budget by dropping whole earliest turns.

Used twice: when training (a conversation longer than `data.max_length` loses its
earliest turns, never a piece of its last answer) and when chatting (the history sent
to the model keeps the latest turns that fit the context window with room for the reply).
Leading system messages are kept as long as anything fits with them.
"""

from __future__ import annotations

from typing import Callable, Optional


def start_points(messages: list[dict]) -> tuple[list[dict], list[int]]:
    """(leading system messages, indices where a kept suffix may begin: each user turn,
    or the first non-system message)."""
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    starts = [i for i in range(n_sys, len(messages)) if messages[i]["role"] == "user" or i == n_sys]
    return messages[:n_sys], starts


def fit_messages(messages: list[dict], fits: Callable[[list[dict]], bool],
                 must_keep: Optional[int] = None) -> tuple[Optional[list[dict]], int]:
    """The longest suffix of whole turns (with the leading system messages if possible)
    for which `fits` holds and that still contains message `must_keep` (default: the last).

    Returns (kept messages, number of messages dropped), or (None, 0) when not even the
    last turn fits. `fits` should be monotone (fewer turns never fit worse); the search is
    a bisection, so it is called O(log turns) times.
    """
    if not messages:
        return [], 0
    must_keep = len(messages) - 1 if must_keep is None else must_keep
    system, starts = start_points(messages)
    starts = [s for s in starts if s <= must_keep]
    if not starts:
        starts = [len(system)] if len(system) <= must_keep else []
    for head in ([system, []] if system else [[]]):
        candidates = [(head + messages[s:], s) for s in starts]
        if not candidates:
            continue
        if fits(candidates[0][0]):
            kept, s = candidates[0]
            return kept, len(messages) - len(kept)
        lo, hi = 1, len(candidates) - 1  # candidates[0] does not fit; find the first that does
        if hi < lo or not fits(candidates[hi][0]):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(candidates[mid][0]):
                hi = mid
            else:
                lo = mid + 1
        kept = candidates[lo][0]
        return kept, len(messages) - len(kept)
    return None, 0
