"""Outcome verification r_out ∈ {0, 1} (METHOD.md §4).

* :class:`MathVerifier` checks math answers with ``math-verify``, gold first. It extracts the last
  ``\\boxed{}`` of the answer span (text after ``</think>``, or the whole response when the think
  block was never closed) and falls back to math-verify's own extraction on that span.
  math-verify's SIGALRM timeouts are switched off (they raise off the main thread); instead each
  check runs in a daemon thread with a deadline, so verification works from any thread, such as
  Dagster's thread pool or a data-loader worker. A check past its deadline counts as incorrect
  with status ``timeout``. A check that could hold the interpreter past any deadline (an exponent
  above :data:`POWER_LIMIT`, e.g. ``10^{10^{10}}``, or a factorial above :data:`FACTORIAL_LIMIT`,
  in the reference or the answer) is not evaluated: the answer is correct only if its text equals
  the reference's, else incorrect with status ``timeout``.
* :class:`NumericVerifier` checks the synthetic task's numeric answers exactly.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Literal, Protocol

from .prompts import THINK_CLOSE

VerdictStatus = Literal["correct", "incorrect", "no_answer", "invalid_reference", "timeout", "error"]

logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: VerdictStatus
    extracted: str | None = None
    detail: str = ""

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


class Verifier(Protocol):
    def verify(self, response: str, reference: str) -> Verdict: ...


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    An unbalanced last box (a truncated response) is skipped in favour of the one before it.
    ``\\boxed 5`` (no braces) is accepted too. Returns None when there is no complete box, or when
    the last one is empty.
    """
    if not text:
        return None
    for m in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:  # an empty last box is no answer (and no class in a majority vote)
            return text[m.end() : i - 1].strip() or None
    bare = re.findall(r"\\boxed\s+([^\s$]+)", text)
    return bare[-1] if bare else None


def answer_span(response: str) -> str:
    """The text after the last ``</think>``, or the whole response if there is none."""
    at = response.rfind(THINK_CLOSE)
    return response if at == -1 else response[at + len(THINK_CLOSE) :]


VERIFY_THREAD = "l2t-verify"


def abandoned_checks() -> int:
    """How many checks of this process :func:`run_with_deadline` abandoned past their deadline are
    still running (a finished check's thread is gone)."""
    return sum(1 for t in threading.enumerate() if t.name == VERIFY_THREAD)


def run_with_deadline(fn, timeout_s: float):
    """Run ``fn()`` in a daemon thread; return (finished, value, error). No signals involved.

    A thread cannot be killed: one past its deadline is abandoned and ends on its own.
    """
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported to the caller, never swallowed silently
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True, name=VERIFY_THREAD)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")


def _normalise_text(s: str) -> str:
    """The answer's text for the exact-match shortcut before math-verify: ``\\text{}``, sizing and
    spacing commands (whole commands only: ``\\leftarrow`` stays), ``$`` and white space dropped,
    a trailing period dropped (never a leading one: ``.35625`` is not ``35625``), and plain text
    without LaTeX commands lower-cased (``Yes`` is ``yes``; ``\\Pi`` is not ``\\pi``)."""
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;:]", "", s)
    s = s.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s if "\\" in s else s.lower()


# The largest exponent and factorial argument a check evaluates: sympy computes 7^{7^{8}} (an
# integer of 4.9M digits) or 10^{10^{10}} in one step that holds the interpreter, so the check's
# deadline (a thread join) cannot fire, and the latter exhausts memory.
POWER_LIMIT = 100_000
FACTORIAL_LIMIT = 10_000


def _operand(text: str, i: int) -> tuple[str, int]:
    """The operand of ``^`` that starts at ``text[i]``: a braced group, a run of digits, a LaTeX
    command or one character; and the index after it."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return "", i
    if text[i] == "{":
        depth, j = 1, i + 1
        while j < len(text) and depth:
            depth += (text[j] == "{") - (text[j] == "}")
            j += 1
        return text[i + 1 : j - 1], j
    m = re.compile(r"\d+|\\[A-Za-z]+|.").match(text, i)
    return m.group(0), m.end()


def _integer_power(expr: str) -> float | None:
    """The value of ``expr`` when it is an integer or a tower of integers (``10^{10}``,
    ``2^{3^2}``; braces and parentheses around it allowed), ``inf`` past :data:`POWER_LIMIT`;
    None for anything else."""
    expr = expr.strip()
    while len(expr) > 1 and expr[0] + expr[-1] in ("{}", "()"):
        expr = expr[1:-1].strip()
    if expr.isdigit():
        return int(expr)
    m = re.match(r"(\d+)\s*\^", expr)
    if m is None:
        return None
    exponent_text, end = _operand(expr, m.end())
    if expr[end:].strip():
        return None
    base, exponent = int(m.group(1)), _integer_power(exponent_text)
    if exponent is None:
        return None
    if base in (0, 1):
        return base
    if exponent * math.log10(base) > math.log10(POWER_LIMIT):
        return math.inf
    return base ** int(exponent)


def too_costly(expr: str) -> str | None:
    """Why evaluating ``expr`` could hold a check past any deadline (an exponent above
    :data:`POWER_LIMIT`, possibly a tower such as ``10^{10^{10}}``, or a factorial above
    :data:`FACTORIAL_LIMIT`); None when it is safe to hand to math-verify."""
    for m in re.finditer(r"\^", expr):
        operand, _ = _operand(expr, m.end())
        value = _integer_power(operand)
        if value is not None and value > POWER_LIMIT:
            return f"an exponent above {POWER_LIMIT} ({operand.strip()[:40]})"
    for m in re.finditer(r"(\d+)\s*!", expr):
        if int(m.group(1)) > FACTORIAL_LIMIT:
            return f"a factorial above {FACTORIAL_LIMIT}! ({m.group(1)[:40]}!)"
    return None


# A whole answer that is one number in E notation ("3e8", "-1.77E-6"), as MinervaMATH's gold
# answers are written; math-verify reads the e there as Euler's number (3e8 -> 3*e*8).
_E_NOTATION = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)\s*")


# A Python float literal divided, "1./3" (two MinervaMATH gold answers: -1./3 and -3./2);
# math-verify reads "-1./3" as -1.
_PY_FLOAT_DIV = re.compile(r"(\d)\.(?=\s*/)")


def scientific_latex(expr: str) -> str:
    """``expr`` in LaTeX's scientific notation when it is a single E-notation number
    (``3e8`` -> ``3 \\times 10^{8}``), else with a Python float literal's trailing point before a
    division dropped (``-1./3`` -> ``-1/3``), else unchanged."""
    m = _E_NOTATION.fullmatch(expr)
    return f"{m.group(1)} \\times 10^{{{m.group(2)}}}" if m else _PY_FLOAT_DIV.sub(r"\1", expr)


def same_in_scale(gold: re.Match, pred, decimals: int = 6) -> bool:
    """Whether the sympy value ``pred`` is a number equal to the E-notation gold ``gold`` (a match
    of :data:`_E_NOTATION`) when both are written in units of the gold's power of ten and rounded
    to ``decimals`` places (math-verify's float rule, applied to the mantissa: ``1.77e-6`` takes
    ``0.00000177`` and ``1.77 \\times 10^{-6}``, not ``1.78 \\times 10^{-6}`` or 0)."""
    try:
        if not getattr(pred, "is_number", False):
            return False
        value = complex(pred.evalf(30))
    except (TypeError, ValueError, AttributeError, ArithmeticError):
        return False
    if value.imag != 0 or not math.isfinite(value.real):
        return False
    exponent = int(gold.group(2))
    return round(value.real / 10.0 ** exponent, decimals) == round(float(gold.group(1)), decimals)


class MathVerifier:
    """math-verify based checker (gold first), thread-safe, with a per-check deadline.

    A gold or boxed answer that is a single E-notation number (MinervaMATH writes ``3e8``) is
    read as ``3 \\times 10^{8}`` (:func:`scientific_latex`): math-verify alone reads ``3e8`` as
    3·e·8, so no correct answer in any other notation matched it. Against such a gold the
    prediction must be a number equal to it in the gold's scale (:func:`same_in_scale`):
    math-verify rounds floats to 6 decimal places, so for a gold like ``2.88e-19`` it would
    accept any small number, 0 included."""

    def __init__(self, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s

    @staticmethod
    def _parse(expr: str):
        from math_verify import parse

        return parse(f"${scientific_latex(expr)}$", parsing_timeout=None)

    def _check(self, gold: str, pred_text: str, boxed: str | None) -> tuple[bool, str | None]:
        """(correct, the predicted answer's text): the boxed answer, else the text math-verify
        extracted from the answer span (None when it found none)."""
        from math_verify import parse, verify

        gold_parsed = self._parse(gold)
        if boxed is not None:
            pred_parsed = self._parse(boxed)
        else:
            pred_parsed = parse(pred_text, parsing_timeout=None)
        extracted = boxed if boxed is not None else (str(pred_parsed[-1]) if pred_parsed else None)
        candidate = boxed if boxed is not None else pred_text
        if _normalise_text(gold) == _normalise_text(candidate):
            return True, extracted if extracted is not None else candidate.strip()
        scientific = _E_NOTATION.fullmatch(gold)
        if scientific is not None:
            return bool(pred_parsed) and same_in_scale(scientific, pred_parsed[0]), extracted
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None)), extracted

    def verify(self, response: str, reference: str) -> Verdict:
        """The verdict of ``response`` against ``reference``; ``extracted`` is the answer it was
        judged by (the last box of the answer span, else math-verify's extraction from the span),
        so majority votes count unboxed answers too."""
        if reference is None or not str(reference).strip():
            return Verdict(False, "invalid_reference", None, "the reference answer is empty")
        if not isinstance(response, str) or not response.strip():
            return Verdict(False, "no_answer", None, "the response is empty")
        span = answer_span(response)
        boxed = extract_boxed(span)
        if boxed is None and not span.strip():
            return Verdict(False, "no_answer", None, "nothing after </think>")
        candidate = boxed if boxed is not None else span
        costly = too_costly(str(reference)) or too_costly(candidate)
        if costly is not None:  # judged by its text alone: evaluating it could outrun the deadline
            if _normalise_text(str(reference)) == _normalise_text(candidate):
                return Verdict(True, "correct", boxed if boxed is not None else candidate.strip())
            return Verdict(False, "timeout", boxed, f"not evaluated: {costly} (equal text only)")
        done, out, err = run_with_deadline(lambda: self._check(str(reference), span, boxed), self.timeout_s)
        if not done:
            return Verdict(False, "timeout", boxed, f"verification took over {self.timeout_s}s")
        if err is not None:
            return Verdict(False, "error", boxed, f"{type(err).__name__}: {err}")
        ok, extracted = out
        return Verdict(bool(ok), "correct" if ok else "incorrect", extracted)


@functools.lru_cache(maxsize=65536)
def equivalent_answers(a: str, b: str) -> bool:
    """Whether two answers are the same answer: :class:`MathVerifier` accepts ``b`` (boxed)
    against ``a`` (``0.5`` and ``\\frac{1}{2}``, ``90^\\circ`` and ``90``). Used for majority votes
    and to find a benchmark's alternatives that its problem text states; cached, since a vote
    compares the same few answers again for every group of a summary."""
    return MathVerifier().verify(f"\\boxed{{{b}}}", a).correct


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class NumericVerifier:
    """Exact numeric check for the synthetic task: the last ``\\boxed{}`` (else the last number
    of the answer span) must equal the reference number within ``tol``."""

    def __init__(self, tol: float = 1e-9):
        self.tol = tol

    def verify(self, response: str, reference: str) -> Verdict:
        try:
            ref = float(str(reference).strip())
        except (TypeError, ValueError):
            return Verdict(False, "invalid_reference", None, f"reference {reference!r} is not a number")
        if not math.isfinite(ref):
            return Verdict(False, "invalid_reference", None, f"reference {reference!r} is not finite")
        if not isinstance(response, str) or not response.strip():
            return Verdict(False, "no_answer", None, "the response is empty")
        span = answer_span(response)
        boxed = extract_boxed(span)
        cand = boxed if boxed is not None else (_NUMBER.findall(span) or [None])[-1]
        if cand is None:
            return Verdict(False, "no_answer", None, "no number in the answer span")
        nums = _NUMBER.findall(cand)
        if len(nums) != 1 or nums[0] != cand.strip().replace(" ", ""):
            return Verdict(False, "incorrect", cand, "the answer is not a single number")
        ok = abs(float(nums[0]) - ref) <= self.tol
        return Verdict(ok, "correct" if ok else "incorrect", cand)
