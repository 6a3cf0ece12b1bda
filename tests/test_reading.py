"""l2t_core.reading: replayed samples, misread steps by context, and teacher-forced reads of
every step checked against one plain forward pass per step."""

from __future__ import annotations

import json

import pytest
import torch

import l2t_core.reading as reading
from l2t_core.models import build_char_tokenizer, build_tiny_qwen2
from l2t_core.rollout.base import Completion
from l2t_core.tasks import arithmetic, walk
from l2t_core.warmstart import held_out

P = walk.Problem("w", "from 6: >> >", "7", 2, 6, (walk.Move(walk.HARD), walk.Move(walk.EASY)))  # 6>>1>7
TEXTS = [
    walk.render_trace(["goal from 6: >> >", "6>>4 then >", "check 6>4>1", "1>7 then end"], "7"),  # right
    walk.render_trace(["6>>4 then >", "check 6>4>1", "1>>9 then end"], "9"),  # misread after a check
    walk.render_trace(["6>>1 then >", "again 6>>1 then >", "1>7 then end"], "7"),  # right, after a repeat
    walk.render_trace(["6>>1 then >", "1>7 then end", "7>2 then end"], "2"),  # a step past the last move
    "no think at all \\boxed{7}",
]


@pytest.fixture(scope="module")
def walk_model():
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=3)
    model.eval()
    return model, tok


def _fake_generate(tok, texts):
    def fake(model, tokenizer, problems, **kw):
        return [[Completion([], tok(t, add_special_tokens=False)["input_ids"], t, True) for t in texts]
                for _ in problems]
    return fake


def test_sample_and_replay_keeps_where_each_read_step_starts(walk_model, monkeypatch):
    model, tok = walk_model
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, TEXTS))
    got = reading.sample_and_replay(model, tok, [P], n=len(TEXTS))
    assert [s.fault for s in got] == [None, "wrong_move", None, "extra_move", "untagged"]
    assert [s.correct for s in got] == [True, False, True, False, True]
    assert [[(r.after, r.right) for r in s.reads] for s in got] == [
        [("restate", True), ("check", True)], [(None, True), ("check", False)],
        [(None, True), ("repeat", True)], [(None, True), ("step", True), ("step", False)], []]
    # each start is the step's first character: the digit the walk should be at
    for s in got:
        assert [s.text[i:i + 2] for i in s.starts] == [f"{r.digit}>" for r in s.reads]
    assert [r.move for r in got[1].reads] == [walk.Move(walk.HARD), walk.Move(walk.EASY)]
    assert got[3].reads[-1].move is None  # past the last move: nothing right to read
    assert got[0].prompt_ids == tuple(tok(walk.build_task_prompt(P), add_special_tokens=False)["input_ids"])


def test_step_reliability_counts_misread_steps_by_context(walk_model, monkeypatch):
    model, tok = walk_model
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, TEXTS))
    r = reading.step_reliability(model, tok, [P], n=len(TEXTS))
    assert r["responses"] == 5 and r["accuracy"] == 0.6
    assert r["faults"] == {"extra_move": 1, "untagged": 1, "wrong_move": 1}
    assert r["contexts"] == {"none": {"steps": 3, "misread": 0, "rate": 0.0},
                             "check": {"steps": 2, "misread": 1, "rate": 0.5},
                             "repeat": {"steps": 1, "misread": 0, "rate": 0.0},
                             "restate": {"steps": 1, "misread": 0, "rate": 0.0},
                             "step": {"steps": 2, "misread": 1, "rate": 0.5}}
    # a real sampling pass runs end to end
    monkeypatch.undo()
    out = reading.step_reliability(model, tok, held_out((2,), 2), n=2, max_new_tokens=24)
    assert out["responses"] == 4 and 0 <= out["accuracy"] <= 1
    assert all(0 <= c["misread"] <= c["steps"] for c in out["contexts"].values())
    with pytest.raises(ValueError, match="does not replay"):
        reading.step_reliability(model, tok, arithmetic.dataset(1, 1, 1, seed=0), n=1)


def _naive_p_wrong(model, tok, sample, read, start, temperature):
    """One plain forward per read: the prefix up to the step's digit, then up to its move."""
    offsets = [len(tok.decode(sample.response_ids[:j])) for j in range(len(sample.response_ids) + 1)]
    j_digit, j_move = offsets.index(start), offsets.index(start + 2)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def next_probs(j):
        ids = torch.tensor([list(sample.prompt_ids) + list(sample.response_ids[:j])])
        with torch.no_grad():
            return torch.softmax(model(input_ids=ids).logits[0, -1].double() / temperature, -1)

    pd, pm = next_probs(j_digit), next_probs(j_move)
    right_digit = pd[digits[read.digit]] / pd[digits].sum()
    right_move = pm[tok.convert_tokens_to_ids(">")] if read.move.hard else pm[digits].sum()
    return float(1 - right_digit * right_move)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_read_probabilities_equal_one_plain_forward_per_step(walk_model, monkeypatch, temperature):
    model, tok = walk_model
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, TEXTS))
    samples = reading.sample_and_replay(model, tok, [P], n=len(TEXTS))
    got = reading.read_probabilities(model, tok, samples, temperature=temperature, batch_size=2)  # padded batches
    want = [(r.after or "none", _naive_p_wrong(model, tok, s, r, start, temperature))
            for s in samples for r, start in zip(s.reads, s.starts) if r.move is not None]
    assert len(got) == len(want) == 8  # the step past the last move is left out
    for (a, p), (b, q) in zip(got, want):
        assert a == b and 0 <= p <= 1 and p == pytest.approx(q, abs=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        reading.read_probabilities(model, tok, samples, temperature=0)


def test_read_probabilities_follow_the_reader(walk_model, monkeypatch):
    """A reader whose logits favour '>' reads every hard move right and every easy move wrong (its
    digit reads are the plain reader's, conditioned on a digit): the probabilities follow the reader."""
    model, tok = walk_model
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, TEXTS[:1]))
    samples = reading.sample_and_replay(model, tok, [P], n=1)  # 6>>... (hard), then 1>7 (easy)
    gt = tok.convert_tokens_to_ids(">")

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            out.logits[..., gt] += 50.0
            return out

    (_, hard_plain), (_, easy_plain) = reading.read_probabilities(model, tok, samples)
    (_, hard_step), (_, easy_step) = reading.read_probabilities(Biased(), tok, samples)
    assert hard_step < hard_plain and easy_step > max(easy_plain, 1 - 1e-9)


def test_read_probabilities_need_one_token_per_character(walk_model, monkeypatch):
    """A subword tokenizer that merges '>>' (or '6>') cannot score a step's two reads: a clear error."""
    from l2t_core.models import build_tokenizer

    model, _ = walk_model
    bpe = build_tokenizer([t for t in TEXTS[:4] for _ in range(20)], vocab_size=320)
    assert len(bpe(">>", add_special_tokens=False)["input_ids"]) == 1  # merged
    monkeypatch.setattr(reading, "generate", _fake_generate(bpe, TEXTS[:1]))
    samples = reading.sample_and_replay(model, bpe, [P], n=1)
    with pytest.raises(ValueError, match="one character per token"):
        reading.read_probabilities(model, bpe, samples)


def test_without_episodes_cuts_repeats_and_restatements_and_replays_again(walk_model, monkeypatch):
    model, tok = walk_model
    wordy = walk.render_trace(["goal from 6: >> >", "6>>4 then >", "check 6>4>1", "again 6>>1 then >",
                               "1>7 then end", "again 1>7 then end"], "7")
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, [wordy, TEXTS[1], TEXTS[4]]))
    full, wrong, untagged = reading.sample_and_replay(model, tok, [P], n=3)
    cut = reading.without_episodes(tok, full, ["repeat"])
    assert cut.text == walk.render_trace(["goal from 6: >> >", "6>>4 then >", "check 6>4>1", "1>7 then end"], "7")
    assert cut.response_ids == tuple(tok(cut.text, add_special_tokens=False)["input_ids"])
    assert cut.fault is None and cut.correct and [(r.after, r.episode) for r in cut.reads] == [("restate", 1), ("check", 3)]
    both = reading.without_episodes(tok, full, ["repeat", "restate"])
    assert both.text == walk.render_trace(["6>>4 then >", "check 6>4>1", "1>7 then end"], "7")
    assert [(r.after, r.episode) for r in both.reads] == [(None, 0), ("check", 2)]
    assert [both.text[i:i + 2] for i in both.starts] == ["6>", "1>"]
    # nothing to cut: the same response; an untagged one stays as it is
    assert reading.without_episodes(tok, wrong, ["repeat"]).text == wrong.text
    assert reading.without_episodes(tok, untagged, ["repeat"]) is untagged
    with pytest.raises(ValueError, match="change no value"):
        reading.without_episodes(tok, full, ["check"])


def test_episode_ablation_reads_each_cut_version(walk_model, monkeypatch):
    model, tok = walk_model
    wordy = walk.render_trace(["goal from 6: >> >", "6>>4 then >", "check 6>4>1", "again 6>>1 then >",
                               "1>7 then end"], "7")
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, [wordy, TEXTS[1]]))
    samples = reading.sample_and_replay(model, tok, [P], n=2)
    res = reading.episode_ablation(model, tok, samples, temperature=0.7)
    assert list(res) == ["none", "repeat", "restate", "repeat+restate"]
    assert res["none"]["episodes_cut"] == 0 and res["repeat"]["episodes_cut"] == 0.5
    assert res["repeat+restate"]["episodes_cut"] == 1.0 and all(r["steps"] == 4 for r in res.values())
    direct = reading.read_probabilities(model, tok, [reading.without_episodes(tok, s, ["repeat"]) for s in samples])
    assert res["repeat"]["p_wrong"] == pytest.approx(sum(p for _, p in direct) / 4)
    assert res["repeat"]["p_wrong"] != pytest.approx(res["none"]["p_wrong"])  # another context, another read


def test_context_or_weights_crosses_every_reader_with_every_sampler(walk_model, monkeypatch):
    model, tok = walk_model
    other = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=4)
    calls = iter([TEXTS[:2], TEXTS[2:4]])
    monkeypatch.setattr(reading, "generate", lambda m, t, problems, **kw: _fake_generate(tok, next(calls))(m, t, problems))
    res = reading.context_or_weights({"a": model, "b": other}, tok, [P], n=2)
    assert res["samplers"]["a"]["steps"] == 4 and res["samplers"]["a"]["misread"] == 0.25
    assert res["samplers"]["b"]["steps"] == 5 and res["samplers"]["b"]["misread"] == 0.2
    assert set(res["matrix"]) == {"a", "b"} and all(set(row) == {"a", "b"} for row in res["matrix"].values())
    # reader b on sampler a's responses is read_probabilities of b on those very samples
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, TEXTS[:2]))
    direct = reading.read_probabilities(other, tok, reading.sample_and_replay(model, tok, [P], n=2))
    cell = res["matrix"]["b"]["a"]
    assert cell["steps"] == len(direct) == 4 and sum(c["steps"] for c in cell["by_after"].values()) == 4
    assert cell["p_wrong"] == pytest.approx(sum(p for _, p in direct) / 4)
    assert cell["by_after"]["check"]["steps"] == 2
    assert res["matrix"]["a"]["a"]["p_wrong"] != pytest.approx(cell["p_wrong"])  # another reader reads otherwise
    json.dumps(res)  # the report is plain JSON
    assert "ablation" not in res


def test_context_or_weights_reports_no_rate_where_no_step_was_read(walk_model, monkeypatch):
    """Samples without a tagged walk step give nothing to read: their misread share and p_wrong are
    None (0.0 read as "never misreads"), and the report stays plain JSON."""
    model, tok = walk_model
    monkeypatch.setattr(reading, "generate", _fake_generate(tok, ["no tags here, \\boxed{7}"]))
    res = reading.context_or_weights({"a": model}, tok, [P], n=1, ablate=[["repeat"]])
    assert res["samplers"]["a"]["steps"] == 0 and res["samplers"]["a"]["misread"] is None
    assert res["matrix"]["a"]["a"] == {"steps": 0, "p_wrong": None, "by_after": {}}
    assert res["ablation"]["a"]["none"]["p_wrong"] is None and res["ablation"]["a"]["repeat"]["steps"] == 0
    json.dumps(res)


def test_cli_reads_writes_the_matrix_and_refuses_bad_model_lists(walk_model, tmp_path, capsys):
    from l2t_core.cli import main as cli_main
    from l2t_core.models import build_tokenizer

    model, tok = walk_model
    for name, seed in (("a", 3), ("b", 5)):
        m = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=seed)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "reads.json"
    assert cli_main(["reads", "-q", "--model", f"a={tmp_path / 'a'}", "--model", f"b={tmp_path / 'b'}", "--levels", "2",
                     "--per-level", "2", "--n", "2", "--max-new-tokens", "24", "--ablate", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads(out.read_text())
    assert set(res["matrix"]) == {"a", "b"} and set(printed["p_wrong"]["a"]) == {"a", "b"}
    assert res["models"] == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")} and res["problems"] == 2
    assert res["samplers"]["a"]["responses"] == 4
    assert set(res["ablation"]["b"]) == {"none", "repeat", "restate", "repeat+restate"} == set(printed["ablation"]["a"])
    with pytest.raises(SystemExit, match="twice"):
        cli_main(["reads", "--model", f"a={tmp_path / 'a'}", "--model", f"a={tmp_path / 'b'}"])
    with pytest.raises(SystemExit, match="NAME=DIR"):
        cli_main(["reads", "--model", "=x"])
    # refused before any model loads: an --out it could not write at the end, levels the task lacks
    with pytest.raises(SystemExit, match=r"l2t reads --out: .* is a directory"):
        cli_main(["reads", "--model", f"a={tmp_path / 'missing'}", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"l2t reads --levels/--per-level: .*steps must be an integer in \[1, 64\]"):
        cli_main(["reads", "--model", f"a={tmp_path / 'missing'}", "--levels", "0"])
    other = tmp_path / "c"  # another tokenizer: the models cannot read each other's samples
    bpe = build_tokenizer(TEXTS[:4] * 5, vocab_size=300)
    build_tiny_qwen2(len(bpe), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=48).save_pretrained(other)
    bpe.save_pretrained(other)
    with pytest.raises(SystemExit, match="one tokenizer"):
        cli_main(["reads", "--model", f"a={tmp_path / 'a'}", "--model", f"c={other}"])
