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

logger = logging.getLogger(__name__)
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


def last_box(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced,
    stripped: ``""`` for an empty box, None when there is no complete box.

    An unbalanced last box (a truncated response) is skipped in favour of the one before it.
    ``\\boxed 5`` (no braces) is accepted too.
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
        if depth == 0:
            return text[m.end() : i - 1].strip()
    bare = re.findall(r"\\boxed\s+([^\s$]+)", text)
    return bare[-1] if bare else None


def extract_boxed(text: str) -> str | None:
    """The answer in the last box of ``text`` (:func:`last_box`); None when there is none or it is
    empty (no answer, and no class in a majority vote)."""
    return last_box(text) or None


EMPTY_BOX = "the last \\boxed{} is empty"


def answer_span(response: str) -> str:
    """The text after the last ``</think>``, or the whole response if there is none."""
    at = response.rfind(THINK_CLOSE)
    return response if at == -1 else response[at + len(THINK_CLOSE) :]


VERIFY_THREAD = "l2t-verify"


def abandoned_checks() -> int:
    """How many checks of this process :func:`run_with_deadline` abandoned past their deadline are
    still running (a finished check's thread is gone)."""
    return sum(1 for t in threading.enumerate() if t.name == VERIFY_THREAD)


_WARM_LOCK = threading.Lock()
_warmed = False


def warm_up() -> None:
    """Load math-verify, sympy and the LaTeX parser once per process, outside any deadline.

    The first check of a process otherwise spends its deadline importing them: about 1 s on an
    idle 2-core machine (measured), several seconds on a loaded one, where a correct answer then
    timed out (a verification worker's first check, with training processes on the same cores).
    Tried once per process, with no time limit (a fixed, small expression); a failure is logged
    and left to each check, which reports it as an ``error`` verdict."""
    global _warmed
    if _warmed:
        return
    with _WARM_LOCK:
        if _warmed:
            return
        try:
            from math_verify import parse, verify

            verify(parse("$\\frac{1}{2}$", parsing_timeout=None), parse("$0.5$", parsing_timeout=None),
                   timeout_seconds=None)
        except Exception as exc:  # noqa: BLE001 - tried once; each check then reports it as its verdict
            logger.warning("loading math-verify failed (%s: %s); checks will report it", type(exc).__name__, exc)
        finally:
            _warmed = True


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
_MAX_DEPTH = 32  # a deeper tower of integers counts as too large
_ASCII_DIGITS = re.compile(r"[0-9]+")  # not str.isdigit: '²'.isdigit() is True and int('²') fails
_PAIRS = {"{": "}", "(": ")"}
_LONG_OPERAND = 400  # a longer integer (tower) is far above the limits
_TOWER_TEXT = re.compile(r"[\s0-9{}()^+\-]+")


def _groups(text: str) -> dict[int, int]:
    """For every ``{`` and ``(`` of ``text``, the index after its matching close (``len(text)`` if
    it never closes), in one pass with a stack."""
    ends: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(text):
        if c in _PAIRS:
            stack.append(i)
        elif c in ("}", ")") and stack and _PAIRS[text[stack[-1]]] == c:
            ends[stack.pop()] = i + 1
    for i in stack:
        ends[i] = len(text)
    return ends


def _operand(text: str, i: int, ends: dict[int, int]) -> tuple[str, int]:
    """The operand that starts at ``text[i]`` (after white space and a sign): a braced or
    parenthesised group, a run of digits, a LaTeX command or one character; and the index after it."""
    while i < len(text) and (text[i].isspace() or text[i] in "+-"):
        i += 1
    if i >= len(text):
        return "", i
    if text[i] in _PAIRS:
        end = ends.get(i, len(text))
        return text[i:end], end
    m = re.compile(r"[0-9]+|\\[A-Za-z]+|.", re.S).match(text, i)
    return m.group(0), m.end()


def _log10_size(expr: str, depth: int = 0) -> float | None:
    """log10 of the magnitude of ``expr`` when it is an integer or a power tower of integers
    (``10^{10}``, ``2^{3^2}``, ``{10}^{(10^{10})}``; groups and signs allowed), ``inf`` past
    :data:`_MAX_DEPTH` levels; None for anything else (a symbol, a fraction, an operator)."""
    if depth > _MAX_DEPTH:
        return math.inf
    expr = expr.strip().lstrip("+-").strip()
    if len(expr) > _LONG_OPERAND:  # judged without parsing, so the screen stays linear in the text
        return math.inf if _TOWER_TEXT.fullmatch(expr) else None
    while len(expr) > 1 and expr[0] in _PAIRS and _groups(expr).get(0) == len(expr) and expr[-1] == _PAIRS[expr[0]]:
        expr = expr[1:-1].strip().lstrip("+-").strip()
    if _ASCII_DIGITS.fullmatch(expr):
        digits = expr.lstrip("0")
        if not digits:
            return -math.inf  # zero
        return float(len(digits)) if len(digits) > 15 else math.log10(int(digits))
    ends = _groups(expr)
    base, after_base = _operand(expr, 0, ends)
    rest = expr[after_base:].lstrip()
    if not base or not rest.startswith("^"):
        return None
    exponent, end = _operand(rest, 1, _groups(rest))
    if rest[end:].strip():
        return None  # more after the power: not a single tower
    base_size, exponent_size = _log10_size(base, depth + 1), _log10_size(exponent, depth + 1)
    if base_size is None or exponent_size is None:
        return None
    if base_size <= 0:
        return base_size  # a base of 0 or 1 stays as it is
    if exponent_size > 12:
        return math.inf
    return base_size * 10.0 ** exponent_size


def too_costly(expr: str) -> str | None:
    """Why evaluating ``expr`` could hold a check past any deadline (an exponent above
    :data:`POWER_LIMIT`, possibly a tower such as ``10^{10^{10}}`` or a negative one, or a factorial
    above :data:`FACTORIAL_LIMIT`, of a number or of a group such as ``(10^{10})!``); None when it
    is safe to hand to math-verify. Linear in the length of ``expr``, and it never raises on text."""
    ends = _groups(expr)
    opener_of = {end: start for start, end in ends.items()}
    power_limit, factorial_limit = math.log10(POWER_LIMIT), math.log10(FACTORIAL_LIMIT)
    for i, c in enumerate(expr):
        if c == "^":
            operand, _ = _operand(expr, i + 1, ends)
            size = _log10_size(operand)
            if size is not None and size > power_limit:
                return f"an exponent above {POWER_LIMIT} ({operand.strip()[:40]})"
        elif c == "!":
            j = i
            while j > 0 and expr[j - 1].isspace():
                j -= 1
            if j > 0 and expr[j - 1] in "})":
                opener = opener_of.get(j)
                operand = expr[opener:j] if opener is not None else ""
            else:
                m = re.search(r"[0-9]+$", expr[:j])
                operand = m.group(0) if m else ""
            size = _log10_size(operand) if operand else None
            if size is not None and size > factorial_limit:
                return f"a factorial above {FACTORIAL_LIMIT}! ({operand.strip()[:40]}!)"
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

    #: a check that runs math-verify (no text shortcut), for a worker pool to see that a worker can
    #: verify (:mod:`l2t_core.verify_pool`)
    canary = ("\\boxed{\\frac{1}{2}}", "0.5")

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
        boxed = last_box(span)
        if boxed == "":  # the answer given is empty: not one to look for elsewhere in the text
            return Verdict(False, "no_answer", None, EMPTY_BOX)
        if boxed is None and not span.strip():
            return Verdict(False, "no_answer", None, "nothing after </think>")
        candidate = boxed if boxed is not None else span
        try:
            costly = too_costly(str(reference)) or too_costly(candidate)
        except Exception as exc:  # noqa: BLE001 - a verdict, never an exception out of verify()
            return Verdict(False, "error", boxed, f"screening the answer failed: {type(exc).__name__}: {exc}")
        if costly is not None:  # judged by its text alone: evaluating it could outrun the deadline
            if _normalise_text(str(reference)) == _normalise_text(candidate):
                return Verdict(True, "correct", boxed if boxed is not None else candidate.strip())
            return Verdict(False, "timeout", boxed, f"not evaluated: {costly} (equal text only)")
        warm_up()  # once per process: the deadline is the check's, not the imports'
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

    canary = ("\\boxed{3}", "3")  # for a worker pool (see MathVerifier.canary)

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
        boxed = last_box(span)
        if boxed == "":
            return Verdict(False, "no_answer", None, EMPTY_BOX)
        cand = boxed if boxed is not None else (_NUMBER.findall(span) or [None])[-1]
        if cand is None:
            return Verdict(False, "no_answer", None, "no number in the answer span")
        nums = _NUMBER.findall(cand)
        if len(nums) != 1 or nums[0] != cand.strip().replace(" ", ""):
            return Verdict(False, "incorrect", cand, "the answer is not a single number")
        ok = abs(float(nums[0]) - ref) <= self.tol
        return Verdict(ok, "correct" if ok else "incorrect", cand)
