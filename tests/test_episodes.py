"""Segmentation (METHOD.md §1): statuses, spans, caps, token mapping, and property tests."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2t_core.episodes import segment, token_episode_ids

TAGGED = "<think>\n<episode_1>a = 1</episode_1>\n<episode_2>b = 2</episode_2>\n</think>\n\n\\boxed{3}"


def test_tagged_episodes_tile_the_response():
    s = segment(TAGGED)
    assert s.status == "tagged"
    assert [e.text for e in s.episodes] == ["a = 1", "b = 2"]
    assert s.episodes[0].start == 0 and s.episodes[-1].end == len(TAGGED)
    assert s.episodes[0].end == s.episodes[1].start == TAGGED.index("<episode_2>")
    assert s.answer_text == "\n\n\\boxed{3}"
    # the last boundary stops before </think>; the answer span is credited to episode K
    assert s.boundaries == [TAGGED.index("<episode_2>"), TAGGED.index("</think>")]


def test_fallback_splits_on_blank_lines_and_single_block():
    s = segment("<think>step one\n\n  step two\n \nstep three</think> \\boxed{1}")
    assert s.status == "fallback" and [e.text for e in s.episodes] == ["step one", "step two", "step three"]
    one = segment("<think>just one line of thought</think>x")
    assert one.status == "fallback" and one.num_episodes == 1


@pytest.mark.parametrize(
    "bad",
    [
        "<think><episode_1>a</episode_1><episode_3>b</episode_3></think>",  # wrong numbering
        "<think><episode_1>a<episode_2>b</episode_2></episode_1></think>",  # nesting
        "<think><episode_1>a</episode_1>\n\n<episode_2>b</think>",  # unclosed
        "<think></episode_1>a</think>",  # close without open
    ],
)
def test_malformed_tags_degrade_to_fallback(bad):
    s = segment(bad)
    assert s.status == "malformed"
    assert s.num_episodes >= 1 and s.episodes[-1].end == len(bad)


def test_numbering_ignore_uses_misnumbered_blocks_in_order_but_not_broken_ones():
    """SegmentationConfig.numbering='ignore' (project option): misnumbered but well-nested blocks
    are used in order; nesting and unclosed tags stay malformed; strict is unchanged."""
    mis = "<think>\n<episode_1>a</episode_1>\n<episode_3>b</episode_2>\n<episode_3>c</episode_3>\n</think>\n\\boxed{1}"
    assert segment(mis).status == "malformed" and segment(mis).num_episodes == 1
    s = segment(mis, numbering="ignore")
    assert s.status == "tagged" and [e.text for e in s.episodes] == ["a", "b", "c"]
    assert any("misnumbered" in n for n in s.notes)
    assert segment(TAGGED, numbering="ignore") == segment(TAGGED)  # well-numbered: identical
    for bad in ("<think><episode_1>a<episode_2>b</episode_2></episode_1></think>",
                "<think><episode_1>a</episode_1>\n\n<episode_2>b</think>", "<think></episode_1>a</think>"):
        assert segment(bad, numbering="ignore").status == "malformed"
    with pytest.raises(ValueError, match="numbering"):
        segment(TAGGED, numbering="loose")


def test_empty_and_missing_think():
    assert segment("").status == "empty" and segment("").num_episodes == 0
    s = segment("<think>   </think>\\boxed{2}")
    assert s.status == "empty" and s.num_episodes == 1
    nt = segment("no think tags here\n\nsecond part")
    assert nt.status == "fallback" and nt.num_episodes == 2 and nt.answer_start is None
    assert any("no <think>" in n for n in nt.notes)


def test_cap_merges_tail_into_last_episode():
    body = "".join(f"<episode_{i}>s{i}</episode_{i}>" for i in range(1, 41))
    s = segment(f"<think>{body}</think>ok", max_episodes=30)
    assert s.status == "tagged" and s.num_episodes == 30
    assert s.episodes[-1].text.startswith("s30") and s.episodes[-1].text.endswith("s40")


def test_token_mapping_uses_offsets(tokenizer):
    enc = tokenizer(TAGGED, return_offsets_mapping=True, add_special_tokens=False)
    s = segment(TAGGED)
    te = token_episode_ids(s, enc["offset_mapping"])
    ids = te.episode_ids
    assert len(ids) == len(enc["input_ids"]) and ids[0] == 0 and ids[-1] == 1
    assert np.all(np.diff(ids) >= 0)
    # every token whose first character lies in episode 2's span belongs to episode 2
    start2 = s.episodes[1].start
    for (a, b), e in zip(enc["offset_mapping"], ids):
        assert e == (1 if a >= start2 else 0)
    assert te.boundaries[0] == 0 and te.boundaries[1] == int((ids == 0).sum())
    assert te.boundaries[2] <= len(ids)


def test_offsets_outside_response_are_rejected():
    with pytest.raises(ValueError, match="outside the response"):
        token_episode_ids(segment("abc"), [(0, 2), (2, 9)])


# ------------------------------------------------------------------ property tests
_pieces = st.sampled_from(
    ["<think>", "</think>", "<episode_1>", "</episode_1>", "<episode_2>", "</episode_2>", "<episode_7>",
     "\n\n", "\n", " ", "x", "42", "\\boxed{", "}", "é", "😀", "\x00", "<episode_", ">"]
)
_texts = st.one_of(st.text(max_size=200), st.lists(_pieces, max_size=40).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts, cap=st.integers(1, 6), numbering=st.sampled_from(["strict", "ignore"]))
def test_segment_never_raises_and_tiles(text, cap, numbering):
    s = segment(text, max_episodes=cap, numbering=numbering)
    assert s.status in ("tagged", "fallback", "malformed", "empty")
    assert s.num_episodes <= cap
    if text:
        assert s.num_episodes >= 1
        assert s.episodes[0].start == 0 and s.episodes[-1].end == len(text)
        for a, b in zip(s.episodes, s.episodes[1:]):
            assert a.end == b.start and a.start <= a.end
        bounds = s.boundaries
        assert all(x <= y for x, y in zip(bounds, bounds[1:]))
    else:
        assert s.status == "empty" and s.num_episodes == 0
    if not re.search(r"</?episode_\d+>", text) and s.status != "empty":
        assert s.status == "fallback"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts)
def test_every_token_in_exactly_one_episode(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    s = segment(text)
    if not enc["input_ids"]:
        return
    te = token_episode_ids(s, enc["offset_mapping"])
    ids = te.episode_ids
    assert len(ids) == len(enc["input_ids"])
    assert ids.min() >= 0 and ids.max() < s.num_episodes
    assert np.all(np.diff(ids) >= 0)  # contiguous spans, so each token is in exactly one
    assert te.token_counts().sum() == len(ids)
    b = te.boundaries
    assert b[0] == 0 and np.all(np.diff(b) >= 0) and b[-1] <= len(ids)
