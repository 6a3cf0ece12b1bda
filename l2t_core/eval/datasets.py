"""Benchmark registry and validated loaders (METHOD.md §7).

Every benchmark is a :class:`BenchmarkSpec` in :data:`BENCHMARKS`: its file in the data directory
(``L2T_DATA_DIR``, see :mod:`l2t_core.data` and ``shared/data/MANIFEST.md``), the row count the
manifest gives for that file, its kind (``math`` or ``code``) and the public Hugging Face hub
dataset used when the file is absent.

:func:`load_benchmark` returns :class:`BenchmarkItem` objects and validates the whole file first:
each line is a UTF-8 JSON object (no key given twice, no unpaired ``\\udXXX`` surrogate escape, no
nesting too deep or number too long to read), ids are unique, ``problem`` and ``answer`` are
non-empty strings, the per-benchmark meta fields (MATH500 level 1-5, Omni-MATH difficulty, Minerva
answer alternatives) have the right type, and the file has the manifest's row count. Every
problem raises :class:`DatasetError` naming the file, the 1-based line and the field (where one
is to blame), saying how to fix it, and quoting at most a short prefix of the bad value; nothing
is returned from a file with any bad row.

Where the data come from, in order:

1. ``<data_dir>/<spec.file>``: the curated copy described in MANIFEST.md (row count checked
   against :attr:`BenchmarkSpec.rows`).
2. ``<data_dir>/<spec.name>.hub.jsonl``: a copy downloaded earlier from the hub (row count checked
   against :attr:`HubSource.rows` when known). It has its own name because a hub copy is not always
   the same version as the curated file (e.g. MATH train there has 7,500 rows with solutions,
   the curated DeepScaleR copy 7,472 answer-only rows).
3. The hub itself, when ``allow_download`` is true: the dataset's Parquet export (the hub's
   ``refs/convert/parquet`` branch, laid out ``<config>/<split>/NNNN.parquet`` for every public
   dataset) is fetched with :func:`huggingface_hub.snapshot_download`, read with pyarrow,
   normalised to the curated schema by :func:`normalise_hub_rows` and written as (2).

Item fields: math items carry ``solution`` (or None), ``alternatives`` (other accepted answer
strings; MinervaMATH takes them from ``meta.answer_alternatives_deepscaler``), ``level`` (MATH500
``meta.level``) and ``tier`` (Omni-MATH tier from ``meta.difficulty``, see :func:`omni_tier`).
HumanEval items map ``task_id → id``, ``prompt → problem``, ``canonical_solution → answer`` and
carry ``test`` and ``entry_point`` as dedicated fields.

The synthetic tasks' held-out splits (``walk_heldout``, ``arithmetic_heldout``:
:func:`heldout_benchmark_names`) are benchmarks of ``l2t eval`` too, generated rather than read:
:mod:`l2t_core.eval.synthetic` builds their items, which carry the task's own ``prompt``. They
have no :class:`BenchmarkSpec`; :func:`get_spec` says where to load them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..atomic_files import write_jsonl_atomic
from ..data import ENV_VAR, data_dir as default_data_dir
from .metrics import answer_key

Kind = Literal["math", "code"]
AnswerRule = Literal["column", "after_hashes", "last_boxed"]

# The hub's automatic Parquet export of every public dataset lives on this revision.
PARQUET_REVISION = "refs/convert/parquet"

# METHOD.md §7 decision: Omni-MATH tiers are difficulty ≤3, ≤5, ≤7 and >7.
OMNI_TIERS: tuple[str, ...] = ("d<=3", "3<d<=5", "5<d<=7", "d>7")

CODE_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A benchmark file or download that cannot be used; the message says where and how to fix it.

    ``path``, ``line`` (1-based) and ``field`` are kept as attributes (None when not applicable).
    """

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = Path(path) if path is not None else None
        self.line = line
        self.field = field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the Hugging Face hub and how its rows map to our schema.

    ``problem``/``answer``/``solution`` list candidate column names (the first one present is
    used; an empty ``solution`` tuple means the dataset has none). ``id_template`` is formatted
    with the row's columns plus ``index`` (the row's position after filtering). ``answer_rule``:
    ``column`` takes the answer column as is (integral floats become integer strings),
    ``after_hashes`` takes the text after GSM8K's ``####`` (commas removed) and ``last_boxed``
    the last ``\\boxed{}`` of the solution. ``keep`` filters rows; ``rows`` is the expected count
    after filtering (None when not pinned).
    """

    repo_id: str
    split: str
    configs: tuple[str, ...] = ("default",)
    problem: tuple[str, ...] = ("problem",)
    answer: tuple[str, ...] = ("answer",)
    solution: tuple[str, ...] = ("solution",)
    id_template: str = "{name}-hub-{index}"
    meta: tuple[str, ...] = ()
    answer_rule: AnswerRule = "column"
    keep: Callable[[Mapping[str, Any]], bool] | None = None
    rows: int | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: its file in the data dir, expected rows (MANIFEST.md), kind and hub source.

    ``level_key``/``tier_key``/``alternatives_key`` name the ``meta`` fields that feed
    :attr:`BenchmarkItem.level`, :attr:`BenchmarkItem.tier` and :attr:`BenchmarkItem.alternatives`.
    ``hub`` is None where no public hub copy of this exact set exists.
    """

    name: str
    file: str
    rows: int
    kind: Kind
    description: str
    hub: HubSource | None
    level_key: str | None = None
    tier_key: str | None = None
    alternatives_key: str | None = None
    training: bool = False

    @property
    def hub_cache_file(self) -> str:
        """File name of the normalised hub copy in the data dir."""
        return f"{self.name}.hub.jsonl"


@dataclass(frozen=True)
class BenchmarkItem:
    """One problem. ``alternatives`` holds accepted answers other than ``answer`` (deduplicated);
    :attr:`accepted_answers` gives all of them. ``meta`` is the row's meta dict (treat it as
    read-only; it is left out of equality and hashing).

    ``prompt`` is the exact prompt text the model is given, when the benchmark builds its own: the
    synthetic held-out sets (:mod:`l2t_core.eval.synthetic`) carry their task's prompt, the one
    the synthetic model was trained on. None (every file benchmark) means METHOD.md §8's math
    prompt of ``problem`` (:func:`l2t_core.prompts.build_prompt`, see
    :func:`l2t_core.eval.runner.prompt_text`)."""

    id: str
    problem: str
    answer: str
    benchmark: str
    alternatives: tuple[str, ...] = ()
    solution: str | None = None
    level: int | None = None
    tier: str | None = None
    test: str | None = None
    entry_point: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    prompt: str | None = None

    @property
    def accepted_answers(self) -> tuple[str, ...]:
        return (self.answer, *self.alternatives)


def _year_before_2024(row: Mapping[str, Any]) -> bool:
    """Keep AIME 1983–2023 (the hub set also holds part of 2024, which is an eval set here)."""
    return int(row["Year"]) <= 2023


def _has_boxed_answer(row: Mapping[str, Any]) -> bool:
    """Keep MATH rows whose solution has a complete ``\\boxed{}`` (the answer is taken from it)."""
    from ..verify import extract_boxed

    return bool(extract_boxed(str(row.get("solution") or "")))


_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")

BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (
    BenchmarkSpec(
        "math500", "math500.jsonl", 500, "math",
        "MATH500 (PRM800K test split of MATH), levels 1-5; meta.level feeds BenchmarkItem.level",
        HubSource("HuggingFaceH4/MATH-500", "test", id_template="{unique_id}",
                  meta=("subject", "level", "unique_id"), rows=500),
        level_key="level"),
    BenchmarkSpec(
        "aime24", "aime24.jsonl", 30, "math", "AIME 2024 I+II, integer answers",
        HubSource("Maxwell-Jia/AIME_2024", "train", problem=("Problem",), answer=("Answer",),
                  solution=("Solution",), id_template="aime24-{ID}", rows=30)),
    BenchmarkSpec(
        "aime25", "aime25.jsonl", 30, "math", "AIME 2025 I+II, integer answers, no solutions",
        HubSource("MathArena/aime_2025", "train", solution=(), id_template="aime25-{problem_idx}",
                  rows=30)),
    BenchmarkSpec(
        "amc23", "amc23.jsonl", 40, "math", "AMC 2023 12A/12B, the 40-problem Qwen/DeepScaleR set",
        HubSource("math-ai/amc23", "test", problem=("problem", "question"), solution=(),
                  id_template="amc23-{index}", rows=40)),
    BenchmarkSpec(
        "minerva", "minerva_math.jsonl", 272, "math",
        "MinervaMATH (OCW courses); alternatives from meta.answer_alternatives_deepscaler",
        HubSource("math-ai/minervamath", "test", problem=("problem", "question"),
                  id_template="minerva-{index}", rows=272),
        alternatives_key="answer_alternatives_deepscaler"),
    BenchmarkSpec(
        "omni_math_rule", "omni_math_rule.jsonl", 2821, "math",
        "Omni-MATH rule-gradable subset (2,821 of 4,428); tiers from meta.difficulty. The hub has "
        "only the full set (benchmark 'omni_math'); this subset comes from GitHub "
        "KbsdJames/omni-math-rule",
        None, tier_key="difficulty"),
    BenchmarkSpec(
        "omni_math", "omni_math.jsonl", 4428, "math",
        "Full Omni-MATH (4,428 olympiad problems); tiers from meta.difficulty",
        HubSource("KbsdJames/Omni-MATH", "test", id_template="omni-{index}",
                  meta=("domain", "difficulty", "source"), rows=4428),
        tier_key="difficulty"),
    BenchmarkSpec(
        "gsm8k_test", "gsm8k_test.jsonl", 1319, "math", "GSM8K test; answer = text after ####",
        HubSource("openai/gsm8k", "test", configs=("main",), problem=("question",),
                  solution=("answer",), answer_rule="after_hashes",
                  id_template="gsm8k-test-{index}", rows=1319)),
    BenchmarkSpec(
        "humaneval", "humaneval.jsonl", 164, "code",
        "OpenAI HumanEval; native fields task_id, prompt, canonical_solution, test, entry_point",
        HubSource("openai/openai_humaneval", "test", configs=("openai_humaneval",), rows=164)),
    BenchmarkSpec(
        "aime_1983_2023", "aime_1983_2023.jsonl", 975, "math",
        "Training: every AIME 1983-2023 problem with answer and AoPS solution (DeepScaleR copy)",
        HubSource("di-zhang-fdu/AIME_1983_2024", "train", problem=("Question",),
                  answer=("Answer",), solution=(), id_template="aime-{ID}",
                  meta=("Year", "Problem Number", "Part"), keep=_year_before_2024),
        training=True),
    BenchmarkSpec(
        "math_train", "math_train_answers.jsonl", 7472, "math",
        "Training: MATH train as DeepScaleR ships it, answers only (hub copy: up to 7,500 with "
        "solutions, answer = last \\boxed{} of the solution, rows without one dropped)",
        HubSource("EleutherAI/hendrycks_math", "train", configs=_MATH_SUBJECTS,
                  answer=(), answer_rule="last_boxed", id_template="math-train-hub-{index}",
                  meta=("level", "type"), keep=_has_boxed_answer),
        training=True),
    BenchmarkSpec(
        "gsm8k_train", "gsm8k_train.jsonl", 7473, "math",
        "Training: GSM8K train with worked solutions; answer = text after ####",
        HubSource("openai/gsm8k", "train", configs=("main",), problem=("question",),
                  solution=("answer",), answer_rule="after_hashes",
                  id_template="gsm8k-train-{index}", rows=7473),
        training=True),
)}


def heldout_benchmark_names() -> tuple[str, ...]:
    """The synthetic held-out benchmarks of ``l2t eval``, ``<task>_heldout`` for every task of
    :data:`l2t_core.tasks.TASKS` (generated, no file; see :mod:`l2t_core.eval.synthetic`)."""
    from ..tasks import TASKS

    return tuple(f"{task}_heldout" for task in TASKS)


def get_spec(name: str) -> BenchmarkSpec:
    """The registry entry for ``name``; an unknown name lists the known ones (the file benchmarks
    and the synthetic held-out ones, which have no spec)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        synthetic = heldout_benchmark_names()
        if name in synthetic:
            raise DatasetError(
                f"benchmark {name!r} is a synthetic held-out set without a file or spec; load it with "
                "l2t_core.eval.synthetic.load_heldout (l2t eval does)") from None
        raise DatasetError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}; synthetic "
                           f"held-out benchmarks (l2t eval): {', '.join(synthetic)}") from None


def omni_tier(difficulty: float) -> str:
    """Omni-MATH tier of a difficulty (METHOD.md §7): ``d<=3``, ``3<d<=5``, ``5<d<=7``, ``d>7``."""
    for bound, tier in zip((3, 5, 7), OMNI_TIERS):
        if difficulty <= bound:
            return tier
    return OMNI_TIERS[-1]


# ----------------------------------------------------------------------------------------------
# Loading


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, *, allow_download: bool = True,
                   limit: int | None = None, strict_count: bool = True) -> list[BenchmarkItem]:
    """The validated items of benchmark ``name`` (see the module docstring for the lookup order).

    ``data_dir`` defaults to :func:`l2t_core.data.data_dir` (``L2T_DATA_DIR``). ``limit`` returns
    the first ``limit`` rows (validated) and skips the row-count check, as does
    ``strict_count=False``. Raises :class:`DatasetError` for a missing, unreadable or invalid file
    and for a failed download.
    """
    spec = get_spec(name)
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of rows, got {limit!r}")
    root, local, cached = _benchmark_paths(spec, data_dir)
    if local.is_file():
        return read_benchmark_file(spec, local, expected_rows=spec.rows, limit=limit, strict_count=strict_count)

    def hub_copy() -> None:  # said every time: the hub copy need not equal the file a run was meant to read
        log.warning("benchmark %s: %s is not in the data directory %s (%s); using the Hugging Face hub copy %s "
                    "(cached as %s), which can differ from it (e.g. fewer accepted answers)", name, spec.file, root,
                    ENV_VAR, spec.hub.repo_id if spec.hub is not None else "", cached)

    if cached.is_file():
        hub_copy()
        expected = spec.hub.rows if spec.hub is not None else None
        return read_benchmark_file(spec, cached, expected_rows=expected, limit=limit, strict_count=strict_count)
    if spec.hub is None:
        raise DatasetError(
            f"benchmark {name!r} needs {spec.file}, which is not in the data directory {root}, and "
            f"this set has no public Hugging Face hub copy ({spec.description}). Set {ENV_VAR} to "
            "the folder that holds it (see shared/data/MANIFEST.md)", path=local)
    if not allow_download:
        raise DatasetError(
            f"benchmark {name!r} needs {spec.file}, which is not in the data directory {root}. Set "
            f"{ENV_VAR} to the folder that holds it (see shared/data/MANIFEST.md), or allow the "
            f"download from the Hugging Face hub dataset {spec.hub.repo_id} (allow_download=True), "
            f"which is cached as {cached}", path=local)
    named = data_dir is not None or bool(os.environ.get(ENV_VAR))
    if named and not root.is_dir():  # a mistyped directory: its benchmarks would silently be hub copies
        raise DatasetError(
            f"benchmark {name!r}: the data directory {root} ({'data_dir' if data_dir is not None else ENV_VAR}) "
            f"does not exist, so {spec.file} cannot be in it. Fix the path; or, to download the Hugging Face "
            f"hub copy {spec.hub.repo_id} and keep it there, create that directory first", path=local)
    download_from_hub(spec, cached)
    hub_copy()
    return read_benchmark_file(spec, cached, expected_rows=spec.hub.rows, limit=limit, strict_count=strict_count)


def benchmark_source(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Which file :func:`load_benchmark` reads for ``name``: the data directory's, or the hub copy
    (cached or to download), as a report records it."""
    spec = get_spec(name)
    _, local, cached = _benchmark_paths(spec, data_dir)
    if local.is_file():
        return str(local)
    repo = spec.hub.repo_id if spec.hub is not None else "none"
    return f"hub copy {repo} ({cached})"


def _benchmark_paths(spec: BenchmarkSpec, data_dir: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """The data directory (``data_dir``, else ``L2T_DATA_DIR``), ``spec``'s file in it and its hub copy's cache."""
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    return root, root / spec.file, root / spec.hub_cache_file


def read_benchmark_file(spec: BenchmarkSpec, path: Path, *, expected_rows: int | None,
                        limit: int | None = None, strict_count: bool = True) -> list[BenchmarkItem]:
    """Parse and validate one JSONL file of ``spec``'s schema (see :func:`load_benchmark`)."""
    items: list[BenchmarkItem] = []
    first_line: dict[str, int] = {}
    for line_no, row in json_lines(path):
        item = _row_to_item(spec, row, path, line_no)
        if item.id in first_line:
            raise DatasetError(
                f"duplicate id {_short(repr(item.id))} (first seen on line {first_line[item.id]}); ids must be "
                "unique, so remove or rename one of the two rows", path=path, line=line_no,
                field="task_id" if spec.kind == "code" else "id")
        first_line[item.id] = line_no
        items.append(item)
        if limit is not None and len(items) == limit:
            return items
    if not items:
        raise DatasetError("the file has no rows; replace it with the copy described in MANIFEST.md",
                           path=path)
    if strict_count and limit is None and expected_rows is not None and len(items) != expected_rows:
        fix = ("delete it, and the next run downloads the hub copy again" if path.name == spec.hub_cache_file else
               "replace it with the manifest's copy")
        raise DatasetError(
            f"has {len(items)} rows but benchmark {spec.name!r} expects {expected_rows} (MANIFEST.md); "
            f"the file is truncated or from another version: {fix}. To use it anyway, evaluate its first rows "
            "(l2t eval --limit N; strict_count=False in code)", path=path)
    return items


def json_lines(path: Path, *, check_text: bool = True) -> Iterable[tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line; bad bytes or JSON raise DatasetError.

    ``check_text=False`` lets unpaired surrogate escapes through, for a caller that validates
    rows itself and quarantines every bad one (the pipeline's ``datasets`` asset)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DatasetError(f"cannot open the file ({exc.strerror}); check its permissions", path=path) from None
    with fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"bytes {raw[exc.start:exc.end]!r} at byte {exc.start} of the line are not "
                    "UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    path=path, line=line_no, field=_field_with_bad_bytes(raw)) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON "
                    "object, so fix or remove this line", path=path, line=line_no) from None
            except DuplicateKey as exc:
                raise DatasetError(
                    f"the key {_short(repr(exc.key))} appears twice in one object, so the row is ambiguous; keep one "
                    "of the two values", path=path, line=line_no, field=exc.key) from None
            except RecursionError:
                raise DatasetError("the JSON is nested too deeply to read; each line must be one flat "
                                   "row object, so fix or remove this line", path=path, line=line_no) from None
            except ValueError as exc:  # e.g. an integer literal over Python's 4,300-digit limit
                raise DatasetError(f"a value cannot be read ({_short(str(exc), 120)}); fix or remove this line",
                                   path=path, line=line_no) from None
            if not isinstance(row, dict):
                raise DatasetError(f"expected a JSON object, got a JSON {type(row).__name__}; each "
                                   "line must be one object", path=path, line=line_no)
            bad = _field_with_lone_surrogate(row) if check_text else None
            if bad is not None:
                raise DatasetError(
                    "holds a \\ud800-\\udfff escape that is not part of a surrogate pair, which is not valid "
                    "Unicode text (it cannot be written as UTF-8); re-export the file from valid text",
                    path=path, line=line_no, field=bad)
            yield line_no, row


class DuplicateKey(ValueError):
    """A JSON object gives ``key`` twice (:func:`unique_keys`)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` object hook: a key given twice in one object is an error (JSON keeps the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any text in ``value`` (keys included, at any depth) holds a lone surrogate; a walk
    with its own stack, so any nesting ``json.loads`` accepted is read without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if any("\ud800" <= c <= "\udfff" for c in v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _field_with_lone_surrogate(row: dict) -> str | None:
    """The first top-level field (key or value) whose text holds a lone surrogate (from a JSON
    ``\\udXXX`` escape); the UTF-8 check of the raw bytes cannot see those."""
    for key, value in row.items():
        if _has_lone_surrogate(key) or _has_lone_surrogate(value):
            return key.encode("utf-8", "backslashreplace").decode() if _has_lone_surrogate(key) else key
    return None


def _short(value: Any, limit: int = 80) -> str:
    """``value`` for an error message: its repr for non-strings, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _field_with_bad_bytes(raw: bytes) -> str | None:
    """The top-level field whose value holds the non-UTF-8 bytes, when the line is otherwise JSON."""
    try:
        row = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except (ValueError, RecursionError):  # not JSON, or not readable JSON: no field to name
        return None
    if not isinstance(row, dict):
        return None
    for key, value in row.items():
        text = json.dumps(value, ensure_ascii=False)
        if any("\udc80" <= c <= "\udcff" for c in key + text):
            return key
    return None


def _required_text(row: Mapping, key: str, path: Path, line_no: int, *, fix: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in row else f"got {_short(value)}"
        raise DatasetError(f"must be a non-empty string ({got}); {fix}", path=path, line=line_no, field=key)
    return value


def _row_to_item(spec: BenchmarkSpec, row: dict, path: Path, line_no: int) -> BenchmarkItem:
    if spec.kind == "code":
        return _code_item(spec, row, path, line_no)
    fix = "every row needs id, problem and answer (see MANIFEST.md)"
    id_ = _required_text(row, "id", path, line_no, fix=fix)
    problem = _required_text(row, "problem", path, line_no, fix=fix)
    answer = _required_text(row, "answer", path, line_no, fix=fix)
    closed = close_braces(answer)
    solution = row.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise DatasetError(f"must be a string or null, got {type(solution).__name__}", path=path,
                           line=line_no, field="solution")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise DatasetError(f"must be a JSON object, got {type(meta).__name__}", path=path, line=line_no,
                           field="meta")
    if closed != answer:  # keep what the file says next to the repaired answer
        meta = {**meta, "answer_unclosed": answer}
        answer = closed
    return BenchmarkItem(
        id=id_, problem=problem, answer=answer, benchmark=spec.name, solution=solution,
        alternatives=_alternatives(spec, meta, answer, problem, path, line_no),
        level=_level(spec, meta, path, line_no), tier=_tier(spec, meta, path, line_no), meta=meta)


def close_braces(answer: str) -> str:
    """``answer`` with the ``}`` it lacks appended, when it opens more ``{`` than it closes
    (escaped ``\\{``/``\\}`` aside), else unchanged.

    Four Omni-MATH rule answers were cut before their last brace upstream (omni-rule-183 is
    ``\\frac{5055}{2^{15}``, its solution ends in ``\\frac{5055}{2^{15}}``); math-verify cannot
    read them, so no response, the correct one included, verified against them."""
    depth = 0
    i = 0
    while i < len(answer):
        c = answer[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
        i += 1
    return answer + "}" * depth


def _code_item(spec: BenchmarkSpec, row: dict, path: Path, line_no: int) -> BenchmarkItem:
    fix = f"HumanEval rows need {', '.join(CODE_FIELDS)}"
    values = {k: _required_text(row, k, path, line_no, fix=fix) for k in CODE_FIELDS}
    meta = {k: v for k, v in row.items() if k not in CODE_FIELDS}
    return BenchmarkItem(id=values["task_id"], problem=values["prompt"], answer=values["canonical_solution"],
                         benchmark=spec.name, test=values["test"], entry_point=values["entry_point"], meta=meta)


def _alternatives(spec: BenchmarkSpec, meta: dict, answer: str, problem: str, path: Path,
                  line_no: int) -> tuple[str, ...]:
    """The accepted answers besides ``answer`` from ``meta[spec.alternatives_key]``, without any
    that the problem text itself states as the answer of an earlier part (:func:`leaked_answers`)."""
    if spec.alternatives_key is None or spec.alternatives_key not in meta:
        return ()
    values = meta[spec.alternatives_key]
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise DatasetError(f"must be a list of non-empty strings, got {_short(values, 200)}", path=path,
                           line=line_no, field=f"meta.{spec.alternatives_key}")
    candidates = tuple(dict.fromkeys(v for v in values if v != answer))
    leaked = leaked_answers(problem, candidates)
    return tuple(v for v in candidates if v not in leaked)


_STATED = re.compile(r"\\boxed\s*\{|The final answer is (.+?)\. I hope it is correct")


def _stated_as_result(candidate: str, squashed_problem: str) -> bool:
    """``candidate`` follows an ``=`` in the problem text and ends there (both without whitespace,
    :func:`~.metrics.answer_key`): a result the quoted solution of an earlier part computes, as
    ``v = c/λ = 4.4677 \\times 10^{14} s^{-1}``."""
    key = answer_key(candidate)
    return bool(key) and re.search("=" + re.escape(key) + r"(?![0-9.])", squashed_problem) is not None


def leaked_answers(problem: str, candidates: Iterable[str]) -> set[str]:
    """The ``candidates`` that ``problem`` itself states as an answer (in a ``\\boxed{}`` or a
    "The final answer is X. I hope it is correct." line, equal as text (whitespace aside) or by
    :func:`~l2t_core.verify.equivalent_answers`) or as a computed result (right after an ``=``,
    as text).

    MinervaMATH's multi-part problems quote the solved earlier parts, answers included, and the
    DeepScaleR answer lists matched to them by problem text hold 37 such earlier-part answers
    (minerva-145 asks for the age in years, 400000; the list has 1, the minutes of part 0 that
    the prompt shows as \\boxed{1}). One more is quoted unboxed: minerva-149 asks for the wave
    number, 1.4903e4, and the list has the frequency 4.4677 \\times 10^{14} that the quoted part 0
    computes (``=4.4677 \\times 10^{14} {s}^{-1}= \\boxed{4.4677} Hz``). Accepting those would score
    a copy of the prompt's answer as correct."""
    from ..verify import equivalent_answers, extract_boxed

    candidates = list(candidates)
    if not candidates:
        return set()
    squashed = answer_key(problem)
    results = {c for c in candidates if _stated_as_result(c, squashed)}
    stated = set()
    for m in _STATED.finditer(problem):
        text = m.group(1) if m.group(1) is not None else extract_boxed(problem[m.start():])
        if text and text.strip():
            stated.add(text.strip())
    return results | {c for c in candidates
                       if any(answer_key(c) == answer_key(s) or equivalent_answers(c, s) for s in stated)}


def _level(spec: BenchmarkSpec, meta: dict, path: Path, line_no: int) -> int | None:
    if spec.level_key is None:
        return None
    value = meta.get(spec.level_key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise DatasetError(f"must be an integer level 1-5, got {_short(value)}; {spec.name} rows carry the "
                           "MATH level 1-5", path=path, line=line_no, field=f"meta.{spec.level_key}")
    return value


def _tier(spec: BenchmarkSpec, meta: dict, path: Path, line_no: int) -> str | None:
    if spec.tier_key is None:
        return None
    value = meta.get(spec.tier_key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"must be a number (the Omni-MATH difficulty), got {_short(value)}", path=path,
                           line=line_no, field=f"meta.{spec.tier_key}")
    return omni_tier(float(value))


# ----------------------------------------------------------------------------------------------
# Hub fallback


def download_from_hub(spec: BenchmarkSpec, dest: Path) -> Path:
    """Fetch ``spec``'s hub dataset (Parquet export), normalise it and write it to ``dest`` as JSONL.

    Network failures, offline mode (``HF_HUB_OFFLINE=1``), a missing repo or split and an
    unwritable destination raise :class:`DatasetError` with the hub id and the way out.
    """
    if spec.hub is None:
        raise DatasetError(f"benchmark {spec.name!r} has no hub source; place {spec.file} in {ENV_VAR}")
    from huggingface_hub import snapshot_download

    hub = spec.hub
    patterns = [f"{config}/{hub.split}/*.parquet" for config in hub.configs]
    try:
        snapshot = Path(snapshot_download(hub.repo_id, repo_type="dataset", revision=PARQUET_REVISION,
                                          allow_patterns=patterns))
    except OSError as exc:  # huggingface_hub's network, offline-mode and HTTP errors are all OSErrors
        raise DatasetError(
            f"could not download benchmark {spec.name!r} from the Hugging Face hub dataset {hub.repo_id} "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}). Check the network connection, unset "
            f"HF_HUB_OFFLINE, log in for gated sets (hf auth login), or place {spec.file} in the data "
            f"directory ({ENV_VAR})", path=dest) from exc
    rows: list[dict] = []
    for config, pattern in zip(hub.configs, patterns):
        files = sorted(snapshot.glob(pattern))
        if not files:
            raise DatasetError(
                f"the hub dataset {hub.repo_id} has no Parquet files for config {config!r}, split "
                f"{hub.split!r} on {PARQUET_REVISION}; the dataset layout changed, so update "
                f"BENCHMARKS[{spec.name!r}].hub", path=dest)
        rows.extend(_read_parquet_rows(files))
    _write_jsonl_atomic(dest, normalise_hub_rows(spec, rows))
    return dest


def _read_parquet_rows(files: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for f in files for row in pq.read_table(f).to_pylist()]


def normalise_hub_rows(spec: BenchmarkSpec, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Hub rows in our file schema: ``{id, problem, answer, solution, meta}`` for math (``meta``
    adds ``hub_repo``), the native HumanEval fields for code. Rows failing ``hub.keep`` are dropped."""
    hub = spec.hub
    if hub is None:
        raise DatasetError(f"benchmark {spec.name!r} has no hub source")
    kept = [r for r in rows if hub.keep is None or hub.keep(r)]
    if spec.kind == "code":
        return [{k: _first_column(spec, r, (k,), i) for k in CODE_FIELDS} for i, r in enumerate(kept)]
    out = []
    for index, row in enumerate(kept):
        problem = _first_column(spec, row, hub.problem, index)
        solution = _first_column(spec, row, hub.solution, index) if hub.solution else None
        try:
            row_id = hub.id_template.format_map({**row, "name": spec.name, "index": index})
        except KeyError as exc:
            raise DatasetError(
                f"hub row {index} of {hub.repo_id} has no column {exc.args[0]!r} for its id (it has {sorted(row)}); "
                f"update id_template in BENCHMARKS[{spec.name!r}].hub") from None
        out.append({
            "id": row_id,
            "problem": problem,
            "answer": _hub_answer(spec, row, solution, index),
            "solution": solution,
            "meta": {"hub_repo": hub.repo_id, **{k: row.get(k) for k in hub.meta}},
        })
    return out


def _first_column(spec: BenchmarkSpec, row: Mapping[str, Any], candidates: tuple[str, ...], index: int):
    """The value of the first candidate column present in ``row``; none present is a DatasetError."""
    for column in candidates:
        if column in row:
            return row[column]
    raise DatasetError(
        f"hub row {index} of {spec.hub.repo_id} has none of the columns {list(candidates)} (it has "
        f"{sorted(row)}); update the column names in BENCHMARKS[{spec.name!r}].hub")


def _hub_answer(spec: BenchmarkSpec, row: Mapping[str, Any], solution: str | None, index: int) -> str:
    hub = spec.hub
    if hub.answer_rule == "last_boxed":
        from ..verify import extract_boxed

        return extract_boxed(solution or "") or ""
    value = _first_column(spec, row, hub.answer, index)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise DatasetError(f"hub row {index} of {hub.repo_id} has no answer ({value!r} in its answer column); "
                           f"the hub copy is incomplete: give the benchmark as a file in the data directory")
    if hub.answer_rule == "after_hashes":
        return str(value).rsplit("####", 1)[-1].strip().replace(",", "")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _write_jsonl_atomic(dest: Path, rows: list[dict]) -> None:
    try:
        write_jsonl_atomic(dest, rows)
    except OSError as exc:
        raise DatasetError(f"cannot write the hub copy ({exc.strerror}); set {ENV_VAR} to a writable "
                           "directory", path=dest) from exc
