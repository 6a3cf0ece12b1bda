"""Episode segmentation of a response (METHOD.md §1).

A response is ``[<think>] reasoning [</think> answer]``. The reasoning is cut into episodes:

* ``tagged``: well-formed ``<episode_1>…</episode_1><episode_2>…`` blocks, used in order;
* ``fallback``: no episode tags, so the reasoning is split on blank lines (or is one episode);
* ``malformed``: tags are present but unclosed, nested or misnumbered; degrades to the fallback;
* ``empty``: the reasoning holds no text at all.

Episodes tile the response: episode 1 starts at character 0, each episode ends where the next
begins, and the last one runs to the end, so the answer span after ``</think>`` belongs to
episode K for credit. Token spans come from the tokenizer's offset mapping on the full response
(:func:`token_episode_ids`), never from re-tokenizing prefixes. Nothing here raises on any string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from .prompts import THINK_CLOSE, THINK_OPEN

Status = Literal["tagged", "fallback", "malformed", "empty"]

_TAG = re.compile(r"<(/?)episode_(\d+)>")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclass(frozen=True)
class Episode:
    """One reasoning step. ``[start, end)`` are character offsets into the response."""

    index: int  # 0-based position k-1
    start: int
    end: int
    text: str  # the step's own content (inside its tags, or the blank-line block)


@dataclass(frozen=True)
class Segmentation:
    """The episodes of one response and where its reasoning ends."""

    response: str
    status: Status
    episodes: tuple[Episode, ...]
    reasoning_end: int  # char offset where the reasoning stops (``</think>`` or the end)
    answer_start: int | None  # char offset just after ``</think>``; None if it was never closed
    notes: tuple[str, ...] = field(default=())

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def answer_text(self) -> str | None:
        return None if self.answer_start is None else self.response[self.answer_start :]

    @property
    def boundaries(self) -> list[int]:
        """Char offsets b_1..b_K where the context s_{k+1} ends (METHOD.md §2).

        b_k is the end of episode k for k < K; for the last episode it is the end of the
        reasoning, so the forced answer of J(s_K ⊕ z_K) comes right after the last step.
        """
        if not self.episodes:
            return []
        ends = [ep.end for ep in self.episodes[:-1]]
        ends.append(max(self.episodes[-1].start, self.reasoning_end))
        return ends


def _think_region(response: str) -> tuple[int, int, int | None]:
    """(reasoning start, reasoning end, answer start) character offsets."""
    open_at = response.find(THINK_OPEN)
    start = open_at + len(THINK_OPEN) if open_at != -1 else 0
    close_at = response.find(THINK_CLOSE, start)
    if close_at == -1:
        return start, len(response), None
    return start, close_at, close_at + len(THINK_CLOSE)


def _parse_tags(text: str, offset: int, check_numbers: bool = True) -> list[tuple[int, int, int]] | None:
    """Well-formed tag blocks as (block start, content start, content end), or None if malformed.

    Well-formed means: open_1, close_1, open_2, close_2, ... with no nesting, no gaps in the
    numbering and every block closed. ``check_numbers=False`` accepts any numbers as long as
    the blocks open and close in turn (``SegmentationConfig.numbering='ignore'``).
    """
    blocks: list[tuple[int, int, int]] = []
    expect, open_pos, content_start = 1, None, None
    for m in _TAG.finditer(text):
        digits = m.group(2)
        # int() refuses over 4,300 digits; no real episode number is that long, so it matches nothing
        is_close, num = m.group(1) == "/", int(digits) if len(digits) <= 18 else -1
        if not check_numbers:
            num = expect
        if not is_close:
            if open_pos is not None or num != expect:
                return None
            open_pos, content_start = m.start(), m.end()
        else:
            if open_pos is None or num != expect:
                return None
            blocks.append((offset + open_pos, offset + content_start, offset + m.start()))
            open_pos, expect = None, expect + 1
    if open_pos is not None:
        return None
    return blocks


def _blank_line_blocks(text: str, offset: int) -> list[tuple[int, int, int]]:
    """Non-empty blank-line-separated blocks as (block start, content start, content end)."""
    blocks = []
    pos = 0
    for m in list(_BLANK_LINE.finditer(text)) + [None]:
        end = m.start() if m is not None else len(text)
        piece = text[pos:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            trail = len(piece.rstrip())
            blocks.append((offset + pos + lead, offset + pos + lead, offset + pos + trail))
        if m is not None:
            pos = m.end()
    return blocks


def segment(response: str, max_episodes: int = 30, numbering: str = "strict") -> Segmentation:
    """Split ``response`` into episodes (METHOD.md §1). Never raises on a string input.

    ``numbering='strict'`` (METHOD.md) treats misnumbered tags as malformed; ``'ignore'`` (this
    project's option, for small models that lose count of long traces) uses the blocks in order
    whatever their numbers, as long as they open and close in turn without nesting.
    """
    if not isinstance(response, str):
        raise TypeError(f"segment: expected the response as str, got {type(response).__name__}")
    if max_episodes < 1:
        raise ValueError(f"segment: max_episodes must be >= 1, got {max_episodes}")
    if numbering not in ("strict", "ignore"):
        raise ValueError(f"segment: numbering must be 'strict' or 'ignore', got {numbering!r}")
    r_start, r_end, answer_start = _think_region(response)
    reasoning = response[r_start:r_end]
    notes: list[str] = []
    if THINK_OPEN not in response:
        notes.append("no <think> tag: the reasoning starts at the beginning of the response")
    if answer_start is None:
        notes.append("no </think> tag: no answer span (the response may be truncated)")

    if not reasoning.strip():
        status: Status = "empty"
        blocks = [(r_start, r_start, r_start)] if response else []
    else:
        has_tags = _TAG.search(reasoning) is not None
        tagged = _parse_tags(reasoning, r_start) if has_tags else None
        if has_tags and not tagged and numbering == "ignore":
            tagged = _parse_tags(reasoning, r_start, check_numbers=False)
            if tagged:
                notes.append("episode tags are misnumbered: used in order (numbering='ignore')")
        if tagged:
            status, blocks = "tagged", tagged
        else:
            status = "malformed" if has_tags else "fallback"
            if has_tags:
                notes.append("episode tags are unclosed, nested or misnumbered: split on blank lines")
            blocks = _blank_line_blocks(reasoning, r_start)

    if len(blocks) > max_episodes:
        notes.append(f"{len(blocks)} episodes capped at {max_episodes}: the tail merged into the last")
        keep = blocks[: max_episodes - 1]
        last = blocks[max_episodes - 1 :]
        blocks = keep + [(last[0][0], last[0][1], last[-1][2])]

    episodes = []
    for i, (b_start, c_start, c_end) in enumerate(blocks):
        start = 0 if i == 0 else b_start
        end = blocks[i + 1][0] if i + 1 < len(blocks) else len(response)
        episodes.append(Episode(index=i, start=start, end=end, text=response[c_start:c_end]))
    return Segmentation(
        response=response,
        status=status,
        episodes=tuple(episodes),
        reasoning_end=r_end,
        answer_start=answer_start,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class TokenEpisodes:
    """Episode membership of each response token.

    ``episode_ids[t]`` is the 0-based episode of token t. ``boundaries[k]`` (length K+1) is the
    number of response tokens in the context s_{k+1}: ``boundaries[0] = 0`` (s_1 = x) and
    ``boundaries[k]`` counts the tokens of episodes 1..k (the last one up to ``</think>``).
    """

    episode_ids: np.ndarray  # int64 [T]
    boundaries: np.ndarray  # int64 [K+1], non-decreasing, boundaries[-1] <= T

    @property
    def num_episodes(self) -> int:
        return len(self.boundaries) - 1

    def token_counts(self) -> np.ndarray:
        return np.bincount(self.episode_ids, minlength=self.num_episodes)


def token_episode_ids(seg: Segmentation, offsets: Sequence[tuple[int, int]]) -> TokenEpisodes:
    """Map tokens to episodes from the tokenizer's offset mapping on the full response.

    A token belongs to the episode that holds its first character; a zero-width token (a special
    token) joins the episode of the token before it. Membership is made non-decreasing, so every
    token belongs to exactly one episode and episodes are contiguous token ranges. An episode can
    own zero tokens when one token straddles its whole text; its gain is then exactly 0. A response
    whose text is empty (no episodes) but which has tokens, all special ones that decoding dropped,
    gets one empty episode holding them (``num_episodes`` 1 here, 0 in the segmentation).
    """
    n_tok = len(offsets)
    tok_start = np.asarray([o[0] for o in offsets], dtype=np.int64).reshape(-1)
    tok_end = np.asarray([o[1] for o in offsets], dtype=np.int64).reshape(-1)
    if n_tok and (tok_start.min() < 0 or tok_end.max() > len(seg.response)):
        raise ValueError(
            "token_episode_ids: an offset lies outside the response "
            f"(len {len(seg.response)}, offsets {int(tok_start.min())}..{int(tok_end.max())}); "
            "compute offsets on exactly the segmented response text"
        )
    if not seg.episodes:
        if n_tok:
            # the text is empty but there are tokens: special tokens that decoding dropped (a sampled
            # pad or chat-control token). One empty episode holds them, so every token has one.
            return TokenEpisodes(np.zeros(n_tok, dtype=np.int64), np.asarray([0, n_tok], dtype=np.int64))
        return TokenEpisodes(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    starts = np.asarray([ep.start for ep in seg.episodes], dtype=np.int64)
    ids = np.searchsorted(starts, tok_start, side="right") - 1
    zero_width = tok_end <= tok_start
    ids = np.where(zero_width, -1, ids)
    ids = np.maximum.accumulate(np.concatenate([[0], ids]))[1:] if n_tok else ids
    ids = np.clip(ids, 0, len(starts) - 1).astype(np.int64)
    char_bounds = np.asarray(seg.boundaries, dtype=np.int64)
    # tokens whose first character lies before the boundary are in the context
    first_char = np.where(zero_width, -1, tok_start)
    first_char = np.maximum.accumulate(first_char) if n_tok else first_char
    tok_bounds = np.searchsorted(first_char, char_bounds, side="left")
    # the context of episode k always contains all tokens of episodes < k
    counts = np.cumsum(np.bincount(ids, minlength=len(starts)))
    tok_bounds[:-1] = counts[:-1]
    tok_bounds[-1] = max(min(tok_bounds[-1], counts[-1]), tok_bounds[-2] if len(tok_bounds) > 1 else 0)
    return TokenEpisodes(ids, np.concatenate([[0], tok_bounds]).astype(np.int64))
