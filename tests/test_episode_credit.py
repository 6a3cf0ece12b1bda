"""Credit by episode kind (l2t_core.episode_credit), the necessary-trace floor and the episode keys."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from l2t_core.episode_credit import credit_by_kind, credit_table, kind_effects, method_configs
from l2t_core.config import RewardConfig
from l2t_core.tasks import arithmetic, walk
from l2t_core.warmstart import necessary_tokens


def test_episode_keys_split_hardness_and_repairs():
    infos = walk.classify_episodes(["goal from 6: >> >", "6>>2 then >", "check 6>4>1", "1>7 then end",
                                    "check 1>7", "again 1>7 then end"])
    assert [i.key for i in infos] == ["restate", "step_hard", "check_hard", "step_easy", "check_easy", "repeat"]
    # 6>>2 is a wrong direct result (F[F[6]] = 1), so the check after it is a repair
    assert infos[2].detail_key == "check_hard_repair" and infos[4].detail_key == "check_easy"
    assert walk.classify_episodes(["6>>1 then end", "check 6>4>1"])[1].detail_key == "check_hard_confirm"
    assert arithmetic.EpisodeInfo("other").key == "other"


def test_necessary_tokens_is_the_trace_with_every_hard_check_and_nothing_redundant():
    class CharTok:  # one token per character: the counts are the texts' lengths
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    rng = random.Random(0)
    problems = [walk.make_problem(rng, lv, idx=i) for i, lv in enumerate([1, 3, 3, 6])]
    floor = necessary_tokens(CharTok(), problems)
    style = walk.TraceStyle(guess_error=0.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    want = {}
    for p in problems:
        text = walk.build_trace(p, random.Random(5), style).text
        kinds = [e.kind for e in walk.build_trace(p, random.Random(5), style).episodes]
        assert kinds.count("check") == sum(m.hard for m in p.moves) and "repeat" not in kinds and "restate" not in kinds
        want.setdefault(str(p.level), []).append(len(text))
    assert floor["per_level"] == {lv: sum(v) / len(v) for lv, v in want.items()}
    assert floor["mean_tokens"] == pytest.approx(sum(sum(v) for v in want.values()) / len(problems))
    # the reference traces the SFT model imitates are never shorter than the floor
    for p in problems:
        ref = walk.build_trace(p, random.Random(1), walk.TraceStyle(easy_check=1.0, repeat=1.0)).text
        assert len(ref) > len(walk.build_trace(p, random.Random(1), style).text)


def test_kind_effects_by_hand():
    c = Counter
    groups = {
        0: [(1.0, c(check_easy=1), 50), (2.0, c(), 40), (0.0, c(check_easy=2, repeat=1), 70)],
        1: [(0.5, c(check_easy=1), 30), (0.5, c(check_easy=1), 30)],  # no response without: not counted
        2: [(-1.0, c(restate=1), 20), (1.0, c(), 10)],
    }
    eff = kind_effects(groups)
    w = eff["with_minus_without"]
    assert w["check_easy"] == {"delta": pytest.approx((1.0 + 0.0) / 2 - 2.0), "cells": 1}
    assert w["repeat"] == {"delta": pytest.approx(0.0 - 1.5), "cells": 1}
    assert w["restate"] == {"delta": pytest.approx(-2.0), "cells": 1}
    assert w["check_hard"] == {"delta": None, "cells": 0}
    # group 1 has no spread: no correlation; groups 0 and 2 are perfectly (anti-)ordered
    import numpy as np

    r0 = float(np.corrcoef([1.0, 2.0, 0.0], [50, 40, 70])[0, 1])
    assert eff["advantage_length_corr"] == {"mean": pytest.approx((r0 - 1.0) / 2), "cells": 2}
    table = credit_table({"methods": {"l2t": {**eff}}})
    assert "| l2t | -1.500 (1) | n/a | -1.500 (1) | -2.000 (1) |" in table


def test_method_configs_and_bad_input(model, tokenizer):
    tok = tokenizer
    cfgs = method_configs(["grpo", "l2t"])
    assert cfgs["l2t"][0] == "l2t" and isinstance(cfgs["l2t"][1], RewardConfig)
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        method_configs({"mine": ("ppo", RewardConfig())})
    with pytest.raises(ValueError, match="no methods"):
        method_configs([])
    problems = [walk.make_problem(random.Random(0), 2)]
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        credit_by_kind(model, tok, problems, group_size=1)
    with pytest.raises(ValueError, match="no problems"):
        credit_by_kind(model, tok, [])


def test_credit_by_kind_runs_every_method_on_the_same_samples(model, tokenizer):
    tok = tokenizer
    rng = random.Random(0)
    problems = [walk.make_problem(rng, 2, idx=i) for i in range(2)]
    rep = credit_by_kind(model, tok, problems, ["grpo", "l2t"], group_size=2, max_new_tokens=12, temperature=1.0)
    assert rep["responses"] == 4 and set(rep["methods"]) == {"grpo", "l2t"}
    assert 0.0 <= rep["tagged_share"] <= 1.0 and 0.0 <= rep["accuracy"] <= 1.0
    for m in rep["methods"].values():
        assert set(m["with_minus_without"]) == {"check_easy", "check_hard", "repeat", "restate"}
