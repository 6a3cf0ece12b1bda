"""How reliably a policy reads the digit walk's next step, and whether a change comes from the
weights or from the contexts the policy writes.

Every step of a walk response (:mod:`l2t_core.tasks.walk`) starts by reading two things: the digit
the walk is at and the problem's next move, ``>`` or ``>>``, from the latest ``then`` list. A
policy that shortens its responses can misread more often for two reasons that call for different
remedies: its weights read worse (the update damaged the skill), or the shorter responses it
writes are contexts in which the same weights read worse (the dropped episodes were memory aids).

* :func:`sample_and_replay` samples responses and replays each against the true walk
  (:func:`~l2t_core.tasks.walk.replay`): its decisive fault and every step read up to it.
* :func:`step_reliability` counts the misread steps of one policy's samples by the kind of episode
  before them.
* :func:`read_probabilities` teacher-forces a READER model on samples drawn by any policy and gives,
  for every step, the reader's probability of reading it wrong at the sampling temperature.
* :func:`context_or_weights` crosses readers and samplers: a row (one reader on every sampler's
  contexts) that rises with the sampler says the contexts are harder; a column (every reader on one
  sampler's contexts) that rises with the reader says the weights read worse.
* :func:`episode_ablation` cuts the episodes of a kind (repeats, restatements) out of a policy's own
  samples and reads them again: if the steps after them are misread more often, those "redundant"
  episodes were memory aids for this model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .episodes import segment
from .rewards.l2t import response_offsets
from .tasks import task_of, walk
from .verify import NumericVerifier
from .warmstart import _task_of_all, generate

__all__ = ["ReplayedSample", "sample_and_replay", "step_reliability", "read_probabilities", "context_or_weights",
           "ABLATABLE", "DEFAULT_ABLATIONS", "without_episodes", "episode_ablation"]


@dataclass(frozen=True)
class ReplayedSample:
    """One sampled response replayed against the true walk: its ``prompt_ids`` and ``response_ids``,
    ``text``, whether it is ``correct``, its decisive ``fault`` (None when right throughout; the
    string ``untagged`` when it does not segment), the :class:`~l2t_core.tasks.walk.StepRead` of every
    step up to the fault, and for each of them ``starts``: the character offset in ``text`` of the
    step's first character (the digit it starts from)."""

    problem: walk.Problem
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    text: str
    correct: bool
    fault: str | None
    reads: tuple[walk.StepRead, ...]
    starts: tuple[int, ...]


def _walk_task(problems: Sequence, where: str):
    task = _task_of_all(problems, where)
    if not hasattr(task, "replay"):
        raise ValueError(f"{where}: the task {task.__name__.rsplit('.', 1)[-1]!r} does not replay "
                         "responses; use the walk task")
    return task


def _content_start(text: str, episode) -> int:
    """Offset in ``text`` of the first non-blank character of ``episode``'s content."""
    body = episode.text.lstrip()
    return text.index(body, episode.start) if body else episode.start


@torch.no_grad()
def sample_and_replay(model, tokenizer, problems: Sequence, *, n: int = 8, temperature: float = 0.7,
                      max_new_tokens: int = 448, seed: int = 0, batch_size: int = 64) -> list[ReplayedSample]:
    """``n`` samples per walk problem at ``temperature``, each replayed against the true walk."""
    task = _walk_task(problems, "sample_and_replay")
    verifier = NumericVerifier()
    comps = generate(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size, n=n,
                     temperature=temperature, seed=seed)
    out = []
    for p, group in zip(problems, comps):
        prompt = tuple(tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"])
        out += [_replayed(p, prompt, tuple(c.response_ids), c.text, verifier) for c in group]
    return out


def _replayed(problem, prompt_ids: tuple[int, ...], response_ids: tuple[int, ...], text: str,
              verifier: NumericVerifier) -> ReplayedSample:
    verdict = verifier.verify(text, problem.answer)
    seg = segment(text)
    if seg.status != "tagged":
        return ReplayedSample(problem, prompt_ids, response_ids, text, verdict.correct, "untagged", (), ())
    f, reads = task_of(problem).replay(problem, [e.text for e in seg.episodes], verdict.extracted)
    starts = tuple(_content_start(text, seg.episodes[r.episode]) for r in reads)
    return ReplayedSample(problem, prompt_ids, response_ids, text, verdict.correct,
                          None if f is None else f.kind, tuple(reads), starts)


ABLATABLE = ("repeat", "restate")  # episode kinds that change no value of the walk
_TAGGED = re.compile(r"<episode_(\d+)>(.*?)</episode_\1>\n?", re.DOTALL)


def without_episodes(tokenizer, sample: ReplayedSample, kinds: Sequence[str]) -> ReplayedSample:
    """``sample`` with every episode of ``kinds`` (``repeat``, ``restate``: the kinds that change no
    value of the walk) cut out and the rest renumbered, replayed again: the same reasoning without
    those episodes, to ask whether they help the steps after them (:func:`episode_ablation`)."""
    bad = sorted(set(kinds) - set(ABLATABLE))
    if bad:
        raise ValueError(f"without_episodes: can cut only {', '.join(ABLATABLE)} episodes (they change no value "
                         f"of the walk), not {', '.join(bad)}")
    if sample.fault == "untagged":
        return sample
    found = list(_TAGGED.finditer(sample.text))
    info = walk.classify_episodes([m.group(2) for m in found])
    text, last, k = "", 0, 0
    for m, e in zip(found, info):
        text += sample.text[last:m.start()]
        last = m.end()
        if e.kind not in kinds:
            k += 1
            text += m.group(0).replace(f"episode_{m.group(1)}>", f"episode_{k}>")
    text += sample.text[last:]
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _replayed(sample.problem, sample.prompt_ids, ids, text, NumericVerifier())


def step_reliability(model, tokenizer, problems: Sequence, *, n: int = 8, temperature: float = 0.7,
                     max_new_tokens: int = 448, seed: int = 0, batch_size: int = 64) -> dict:
    """How reliably a policy carries the walk on, by what came before each step: ``n`` samples per
    problem at ``temperature``, each replayed against the true walk up to its decisive fault.

    Returns ``responses``, ``accuracy``, ``faults`` (responses per decisive fault kind; ``untagged``
    for responses that do not segment) and ``contexts``: per kind of the episode before a step
    (``check``, ``repeat``, ``step``, ``restate``, ``none``), the ``steps`` taken there, the
    ``misread`` ones (a wrong move, a wrong start digit, a move past the end) and their ``rate``.
    """
    samples = sample_and_replay(model, tokenizer, problems, n=n, temperature=temperature,
                                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return {"responses": len(samples), "accuracy": sum(s.correct for s in samples) / max(1, len(samples)),
            "temperature": temperature, **_counts(samples)}


def _counts(samples: Sequence[ReplayedSample]) -> dict:
    steps: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    faults: dict[str, int] = defaultdict(int)
    for s in samples:
        if s.fault is not None:
            faults[s.fault] += 1
        for r in s.reads:
            cell = steps[r.after or "none"]
            cell[0] += 1
            cell[1] += not r.right
    return {"faults": dict(sorted(faults.items())),
            "contexts": {k: {"steps": v[0], "misread": v[1], "rate": v[1] / max(1, v[0])}
                         for k, v in sorted(steps.items())}}


def _single_char_ids(tokenizer, chars: str) -> list[int]:
    ids = []
    for ch in chars:
        got = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(f"read_probabilities: {ch!r} is not one token of this tokenizer; the read of a walk "
                             "step is scored on a tokenizer that writes each digit and '>' as its own token (the "
                             "warm start's character tokenizer)")
        ids.append(got[0])
    return ids


@torch.no_grad()
def read_probabilities(reader, tokenizer, samples: Sequence[ReplayedSample], *, temperature: float = 0.7,
                       batch_size: int = 32) -> list[tuple[str, float]]:
    """For every read step of ``samples`` (whoever sampled them), ``(after, p_wrong)``: the ``reader``'s
    probability, teacher-forced on the sample's own text up to the step, of reading the step wrong
    when sampling at ``temperature``.

    A step ``6>>1 then ...`` reads twice: its first character, given that it is a digit (and not the
    ``a`` of an ``again`` or the ``c`` of a ``check``), is the digit the walk is at; the character
    after ``6>`` is ``>`` for a hard move and a digit for an easy one. So
    ``p_wrong = 1 - P(digit | a digit) * P(move | 6>)``, each softmax at ``temperature``. Steps past
    the problem's last move (no right move to read) are left out.
    """
    if temperature <= 0:
        raise ValueError(f"read_probabilities: temperature must be > 0, got {temperature}")
    digit_ids = torch.tensor(_single_char_ids(tokenizer, "0123456789"))
    (hard_id,) = _single_char_ids(tokenizer, ">")
    # (sample, [(after, digit, move, token of the digit, token of the move)]), checked before any compute
    todo = []
    for s in samples:
        reads = [(r, start) for r, start in zip(s.reads, s.starts) if r.move is not None]
        if not reads:
            continue
        token_at = {a: j for j, (a, b) in enumerate(response_offsets(tokenizer, s.text, s.response_ids)) if b == a + 1}
        steps = []
        for r, start in reads:
            if start not in token_at or start + 2 not in token_at:
                raise ValueError(f"read_probabilities: the step at character {start} of a response to "
                                 f"{s.problem.problem!r} is not written one character per token; use the warm "
                                 "start's character tokenizer")
            steps.append((r.after or "none", r.digit, r.move, token_at[start], token_at[start + 2]))
        todo.append((s, steps))
    out: list[tuple[str, float]] = []
    reader.eval()
    device = next(reader.parameters()).device
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        seqs = [list(s.prompt_ids) + list(s.response_ids) for s, _ in batch]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(seqs):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = 1
        logits = reader(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for i, (s, steps) in enumerate(batch):
            for after, digit, move, j_digit, j_move in steps:
                # the logits at position t predict token t + 1
                p_digit = torch.softmax(logits[i, len(s.prompt_ids) + j_digit - 1] / temperature, -1)[digit_ids]
                p_move = torch.softmax(logits[i, len(s.prompt_ids) + j_move - 1] / temperature, -1)
                right_digit = (p_digit[digit] / p_digit.sum()).item()
                right_move = p_move[hard_id].item() if move.hard else p_move[digit_ids].sum().item()
                out.append((after, 1.0 - right_digit * right_move))
    return out


def context_or_weights(models: Mapping[str, object], tokenizer, problems: Sequence, *, n: int = 8,
                       temperature: float = 0.7, max_new_tokens: int = 448, seed: int = 0,
                       batch_size: int = 64, ablate: Sequence[Sequence[str]] = ()) -> dict:
    """Each of ``models`` samples ``n`` responses per problem; each then reads every model's samples.

    Returns ``samplers`` (per model: responses, accuracy, steps read and the share misread in its
    own samples, faults) and ``matrix[reader][sampler]``: ``steps`` and ``p_wrong``, the reader's mean
    probability of misreading a step of the sampler's responses (:func:`read_probabilities`; ``misread``
    and ``p_wrong`` are None where no tagged walk step was read), also
    ``by_after`` the kind of episode before the step. With ``ablate`` (entries of kinds, e.g.
    ``[["repeat"]]``), also ``ablation[model]``: each model reading its own samples with those
    episodes cut out (:func:`episode_ablation`). All models must share ``tokenizer``.
    """
    samples = {name: sample_and_replay(m, tokenizer, problems, n=n, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
               for name, m in models.items()}
    samplers = {}
    for name, ss in samples.items():
        counts = _counts(ss)
        steps = sum(c["steps"] for c in counts["contexts"].values())
        misread = sum(c["misread"] for c in counts["contexts"].values())
        samplers[name] = {"responses": len(ss), "accuracy": sum(s.correct for s in ss) / max(1, len(ss)),
                          "steps": steps, "misread": _share(misread, steps), "faults": counts["faults"]}
    matrix: dict[str, dict[str, dict]] = {}
    for reader_name, reader in models.items():
        row = matrix[reader_name] = {}
        for sampler_name, ss in samples.items():
            got = read_probabilities(reader, tokenizer, ss, temperature=temperature)
            by_after: dict[str, list[float]] = defaultdict(list)
            for after, p in got:
                by_after[after].append(p)
            row[sampler_name] = {
                "steps": len(got), "p_wrong": _share(sum(p for _, p in got), len(got)),
                "by_after": {k: {"steps": len(v), "p_wrong": sum(v) / len(v)} for k, v in sorted(by_after.items())},
            }
    out = {"temperature": temperature, "n": n, "problems": len(problems), "samplers": samplers, "matrix": matrix}
    if ablate:
        out["ablation"] = {name: episode_ablation(m, tokenizer, samples[name], kinds=ablate, temperature=temperature)
                           for name, m in models.items()}
    return out


def _share(total: float, steps: int) -> float | None:
    """``total / steps``, or None when no step was read (no tagged walk step in the samples): a rate
    of nothing is not 0."""
    return total / steps if steps else None


DEFAULT_ABLATIONS: tuple[tuple[str, ...], ...] = (("repeat",), ("restate",), ("repeat", "restate"))


def episode_ablation(reader, tokenizer, samples: Sequence[ReplayedSample], *,
                     kinds: Sequence[Sequence[str]] = DEFAULT_ABLATIONS, temperature: float = 0.7) -> dict:
    """Are a policy's "redundant" episodes memory aids? ``reader`` (usually the policy that wrote
    ``samples``) reads the samples teacher-forced as written and with every episode of each entry of
    ``kinds`` cut out (:func:`without_episodes`). Returns per entry (``none`` for the samples as
    written; otherwise the kinds joined by ``+``) the ``steps`` read, ``p_wrong``, the mean
    probability of misreading a step (:func:`read_probabilities`), and ``episodes_cut`` per response.
    """
    out = {}
    whole = [_episodes(s) for s in samples]
    for ks in [()] + [tuple(k) for k in kinds]:
        cut = [without_episodes(tokenizer, s, ks) for s in samples] if ks else list(samples)
        got = read_probabilities(reader, tokenizer, cut, temperature=temperature)
        removed = [n - _episodes(c) for n, c in zip(whole, cut)]
        out["+".join(ks) or "none"] = {"steps": len(got), "p_wrong": _share(sum(p for _, p in got), len(got)),
                                       "episodes_cut": sum(removed) / max(1, len(removed))}
    return out


def _episodes(sample: ReplayedSample) -> int:
    return len(_TAGGED.findall(sample.text))
