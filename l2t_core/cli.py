"""The ``l2t`` command line: ``l2t warmstart``, ``l2t train``, ``l2t miniature``, ``l2t pool``, ``l2t eval``, ``l2t reads``,
``l2t compare``, and the walk-task probes (``step-gains``, ``credit``, ``guess-trust``, ``check-odds``).

Configuration comes from an optional JSON/YAML file (``--config``), then dotted overrides
(``--set reward.credit.beta=0.3``), then the explicit flags; the result is validated as one typed
config before any compute, and a wrong value fails with the field's name and what is allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .atomic_files import cannot_create, write_text_atomic


def quiet_progress_bars() -> None:
    """``-q``: no progress bars from transformers either (its "Loading weights" bar on every
    ``from_pretrained``), in this process and in the worker processes it starts (``l2t miniature``'s
    runs), which read ``HF_HUB_DISABLE_PROGRESS_BARS`` when they import transformers."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # imported already: its switch was read at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` strings applied to a nested dict (values parsed as JSON when they can be);
    a malformed one ends the command with its reason (:func:`l2t_core.config.apply_settings`)."""
    from .config import apply_settings

    try:
        return apply_settings(base, overrides, "--set", example="reward.credit.beta=0.3")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _refuse_url_credentials(what: str, value: str) -> None:
    """SystemExit (naming ``what`` and the redacted URL only) when ``value`` has credentials in it."""
    from .urls import CredentialsInURL, refuse_credentials

    try:
        refuse_credentials(value, what)
    except CredentialsInURL as exc:
        raise SystemExit(str(exc)) from None


def refuse_credentials_in_args(args: argparse.Namespace) -> None:
    """No URL given on the command line (``--out``, ``--config``, ``--policy``, ``--model``,
    ``--set out=...``, ...) may carry credentials: l2t would save and show it (l2t_core.urls)."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                _refuse_url_credentials(f"l2t {args.command} --{dest.replace('_', '-')}", v)


def _shown(value: Any) -> str:
    """``value`` for an error message: every URL in it redacted."""
    from .urls import redact_urls_in

    return repr(redact_urls_in(value))


def _read_config_text(path: str) -> str:
    """The text of a local config file or of any fsspec URL (``s3://bucket/run/train.yaml``: the
    Kubernetes launcher writes the config next to the run; s3fs reads credentials from the environment).
    A URL with credentials in it is refused (they would show in messages); they come from the
    environment (AWS_ACCESS_KEY_ID, FSSPEC_<PROTOCOL>_<OPTION>, ...)."""
    _refuse_url_credentials("--config", path)
    if "://" not in path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"config file {path!r} not found")
        data = p.read_bytes()
    else:
        data = _read_config_url(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"config file {path!r} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 4]!r}); "
                         "save it as UTF-8") from None


def _read_config_url(path: str) -> bytes:
    import fsspec

    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise SystemExit(f"cannot open config URL {path!r}: {exc}. For s3:// install the 'pipeline' extra (s3fs).")
    try:
        return fs.cat_file(fs_path)
    except FileNotFoundError:
        raise SystemExit(f"config file {path!r} not found") from None
    except Exception as exc:  # noqa: BLE001 - any backend error (permissions, endpoint) stops here
        raise SystemExit(f"cannot read config URL {path!r} ({type(exc).__name__}: {exc}); check the URL and "
                         "the storage credentials in the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")


def _unique_keys_loader():
    """yaml's SafeLoader, refusing a key given twice in one mapping (it keeps the last silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def flatten_mapping(self, node):
            # each mapping's own keys, checked once and before the merge keys (`<<: *base`, whose keys it
            # may override) are flattened into it: flattening rewrites an anchored node in place
            checked = self.__dict__.setdefault("_unique_checked", set())
            if id(node) not in checked:
                checked.add(id(node))
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node)
                    try:
                        hash(key)
                    except TypeError:  # refused by the SafeLoader itself, with its own message
                        continue
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice in one mapping; keep one", key_node.start_mark)
                    seen.add(key)
            super().flatten_mapping(node)

    return UniqueKeys


def load_config_file(path: str | None) -> dict:
    """The mapping in a JSON or YAML file (``.yaml``/``.yml``), a local path or an fsspec URL."""
    if not path:
        return {}
    text = _read_config_text(path)
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_keys_loader()) or {}
        except yaml.YAMLError as exc:
            raise SystemExit(f"config file {path!r} is not valid YAML: {exc}") from None
    else:
        from .eval.datasets import DuplicateKey, unique_keys

        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"config file {path!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno} (a .yaml/.yml file is read as YAML)") from None
        except DuplicateKey as exc:
            raise SystemExit(f"config file {path!r}: the key {exc.key!r} is given twice in one object; keep one") from None
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path!r} must hold a mapping at the top level")
    return data


def build_config(model_cls, args, flag_fields: dict[str, str]):
    """File, then ``--set`` overrides, then explicit flags; validated as ``model_cls``."""
    data = apply_overrides(load_config_file(getattr(args, "config", None)), getattr(args, "set", None) or [])
    for flag, field in flag_fields.items():
        v = getattr(args, flag, None)
        if v is not None:
            data = apply_overrides(data, [f"{field}={json.dumps(v)}"])
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid {model_cls.__name__}:"]
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            lines.append(f"  {loc}: {e['msg']} (got {_shown(e.get('input'))})")
        raise SystemExit("\n".join(lines)) from None


def positive_int(text: str) -> int:
    """argparse type of a count (problems, samples, tokens, threads, workers): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or YAML file with the config: a local path or an fsspec URL (s3://...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true",
                   help="print the whole configuration (file, overrides, flags and every default) as YAML and exit "
                        "before any compute; the output is a valid --config")


def print_config(cfg) -> int:
    """The validated ``cfg`` as YAML on stdout (URLs redacted), loadable again with ``--config``."""
    import yaml

    from .urls import redact_urls_in

    print(yaml.safe_dump(redact_urls_in(json.loads(cfg.model_dump_json())), sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .run_lease import RunInUse
    from .trainer import ResumeError, Trainer
    from .rewards.compression import TargetError
    from .training_data import TrainingDataError

    from .launcher_watch import watch_launcher
    from .pipes import pipes_session, step_line, step_lines, train_metadata

    cfg = build_config(TrainConfig, args, {"policy": "policy", "policy_revision": "policy_revision", "method": "method",
                                          "out": "out", "steps": "steps"})
    if args.print_config:
        return print_config(cfg)
    watch_launcher()  # launched by the pipeline: stop when the launching step process is gone
    # launched by Dagster Pipes: each step is streamed as it finishes, then the run's metadata;
    # standalone: no-op
    with pipes_session() as pipes:
        trainer = Trainer(cfg, show_progress=not args.quiet and not pipes.active)
        streamed: list[int] = []

        def report(row: dict) -> None:
            pipes.log(step_line(row))
            streamed.append(int(row["step"]))

        try:
            result = trainer.run(on_step=report if pipes.active else None)
        except (TrainingDataError, ResumeError, TargetError, RunInUse) as exc:  # refused before any compute: one line
            raise SystemExit(f"l2t train: {exc}") from None
        for line in step_lines(result, skip=streamed):  # steps of earlier sessions (a resumed run)
            pipes.log(line)
        latest = trainer.storage.latest_checkpoint()
        pipes.report_materialization(train_metadata(result, latest[1] if latest else None))
    from .urls import redact_urls_in

    print(json.dumps(redact_urls_in({"out": result.out, "final_step": result.final_step,
                                     "checkpoint": result.checkpoint})))
    return 0


def cmd_warmstart(args) -> int:
    from .warmstart import WarmStartConfig, warm_start

    cfg = build_config(WarmStartConfig, args, {})
    if args.print_config:
        return print_config(cfg)
    if (Path(args.out) / "warmstart.json").exists():  # as l2t sft: a finished model is never overwritten
        raise SystemExit(f"l2t warmstart --out {args.out}: it holds a warm start already; choose another --out or "
                         f"remove it")
    path = warm_start(args.out, cfg)
    print(json.dumps({"checkpoint": str(path)}))
    return 0


def cmd_sft(args) -> int:
    from .eval.datasets import DatasetError
    from .launcher_watch import watch_launcher
    from .models import ModelLoadError
    from .sft import SFTConfig, SFTError, run_sft

    cfg = build_config(SFTConfig, args, {"model": "model", "model_revision": "model_revision", "data": "data", "out": "out",
                                        "steps": "steps"})
    if args.print_config:
        return print_config(cfg)
    watch_launcher()  # as l2t train
    from .pipes import pipes_session

    # launched by Dagster Pipes (the pipeline's base_model of kind 'sft'): the summary goes to the
    # run's event log; standalone: no-op
    with pipes_session() as pipes:
        try:
            out = run_sft(cfg, show_progress=not args.quiet and not pipes.active)
        except (SFTError, DatasetError, ModelLoadError, FileExistsError) as exc:  # refused before any compute
            raise SystemExit(f"l2t sft: {exc}") from None
        report = json.loads((out / "sft_report.json").read_text())
        pipes.log(f"SFT of {cfg.model} on {report['examples']} traces done in {report['sft_seconds']:.0f} s: "
                  f"loss {report['final_loss']:.3f}; model in {out}")
    print(json.dumps({"checkpoint": str(out)}))
    return 0


def cmd_miniature(args) -> int:
    from .miniature import MiniatureConfig, ReuseError, run_miniature

    cfg = build_config(MiniatureConfig, args, {"methods": "methods", "seeds": "seeds"})
    if args.print_config:
        return print_config(cfg)
    try:
        report = run_miniature(args.out, cfg, show_progress=not args.quiet)
    except ReuseError as exc:  # --out holds work made with another configuration: nothing was overwritten
        raise SystemExit(f"l2t miniature --out {args.out}: {exc}") from None
    print(json.dumps({"out": args.out, "table": report["table_path"]}))
    return 0


def cmd_eval(args) -> int:
    """Sample, verify/execute and report a model on benchmarks (METHOD.md §7): math benchmarks
    and the synthetic tasks' held-out splits (``walk_heldout``, ..., with their task prompt)
    through evaluate_math, HumanEval (kind "code") through evaluate_code, one report."""
    from .eval.code import HUMANEVAL_N, check_k_values, evaluate_code
    from .eval.datasets import DatasetError, benchmark_source
    from .eval.journal import JournalInUse, SampleJournal, held
    from .eval.report import ReportDirError, check_report_dir, finished_results, write_report
    from .eval.runner import EvalSettings, eval_identity, evaluate_math
    from .eval.synthetic import (HeldOutOptionError, HeldOutOptions, benchmark_kind, check_options, is_heldout,
                                 load_eval_benchmark)
    from .hub import hub_commit
    from .models import ModelLoadError, check_model_source, weights_fingerprint
    from .rollout import load_engine
    from .rollout.base import check_vllm_temperature

    check_model_source(args.model)  # a wrong --model path fails before any benchmark is downloaded
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        raise SystemExit(f"l2t eval --vllm-gpu-memory-utilization: a share of the GPU's memory in (0, 1], "
                         f"got {args.vllm_gpu_memory_utilization}")
    try:
        kinds = {name: benchmark_kind(name) for name in args.benchmarks}  # unknown names fail here
    except DatasetError as exc:
        raise SystemExit(f"l2t eval --benchmarks: {exc}") from None
    try:
        heldout = HeldOutOptions(levels=tuple(args.heldout_levels) if args.heldout_levels else None,
                                 per_level=args.heldout_per_level, seed=args.heldout_seed)
        check_options(args.benchmarks, heldout)
    except HeldOutOptionError as exc:
        raise SystemExit(f"l2t eval --heldout-{exc.option.replace('_', '-')}: {exc}") from None
    # a flag that would change nothing here is refused rather than silently ignored
    unused = [(args.pass_k, "--pass-k", "HumanEval (humaneval)", "code" in kinds.values()),
              (args.heldout_levels or args.heldout_seed is not None or args.heldout_per_level != 50,
               "--heldout-*", "a synthetic held-out benchmark (walk_heldout, ...)", any(map(is_heldout, kinds))),
              (args.vllm_max_model_len is not None or args.vllm_gpu_memory_utilization != 0.9, "--vllm-*",
               "the vllm engine (--engine vllm)", args.engine == "vllm"),
              (args.limit is not None, "--limit", "a file benchmark (held-out sets take --heldout-per-level)",
               not all(map(is_heldout, kinds)))]
    for given, flag, applies_to, present in unused:
        if given and not present:
            raise SystemExit(f"l2t eval {flag}: applies to {applies_to}, which this evaluation has not; drop it")
    base = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                verify_workers=args.verify_workers, verify_timeout_s=args.verify_timeout,
                prompts_per_call=args.prompts_per_call)
    if args.n is not None and args.n < 1:
        raise SystemExit(f"l2t eval --n: samples per problem must be >= 1, got {args.n}")
    try:  # bad flags fail here, before the model loads
        settings = {"math": EvalSettings(n=args.n or 20, **base), "code": EvalSettings(n=args.n or HUMANEVAL_N, **base)}
        if args.engine == "vllm" and args.temperature > 0:
            check_vllm_temperature(args.temperature, "--temperature")
    except ValueError as exc:  # named by its flag: EvalSettings.top_p is --top-p
        flag = lambda m: "--" + m.group(1).removesuffix("_s").replace("_", "-")  # noqa: E731 - verify_timeout_s
        raise SystemExit("l2t eval: " + re.sub(r"EvalSettings\.(\w+)", flag, str(exc))) from None
    code_k = None
    if "code" in kinds.values():
        n = settings["code"].n
        try:
            code_k = check_k_values(args.pass_k if args.pass_k else (1, n), n)
        except ValueError as exc:
            raise SystemExit(f"l2t eval --pass-k: {exc}") from None
    try:  # before hours of sampling: a report that cannot be written, or would replace another evaluation's
        check_report_dir(args.out, model=args.model, benchmarks=list(args.benchmarks))
    except ReportDirError as exc:
        raise SystemExit(f"l2t eval --out: {exc}") from None
    try:  # all loaded and validated before the model; which file each one was read from, as it is read
        sources = {name: benchmark_source(name) for name in args.benchmarks if not is_heldout(name)}
        items = {name: load_eval_benchmark(name, limit=args.limit, heldout=heldout) for name in args.benchmarks}
    except HeldOutOptionError as exc:
        raise SystemExit(f"l2t eval --heldout-{exc.option.replace('_', '-')}: {exc}") from None
    except DatasetError as exc:  # not in the data directory and not downloadable, or malformed
        raise SystemExit(f"l2t eval --benchmarks: {exc}") from None
    # how each benchmark is evaluated, recorded with it: a rerun into --out (after a crash) keeps the
    # benchmarks finished with exactly these weights and settings and refuses to mix in other ones. The
    # weights by content (a local directory's files, a hub id's commit): other weights at the same path (a
    # retrained model, a moved branch) are another evaluation, never resumed from this one's samples
    try:
        model_weights = (weights_fingerprint(args.model) if Path(args.model).is_dir()
                         else f"hub:{args.model}@{hub_commit(args.model)}")
    except ModelLoadError as exc:
        raise SystemExit(f"l2t eval --model: {exc}") from None
    identities = {name: {"model": model_weights, "engine": args.engine, "device": args.device,
                         "limit": None if is_heldout(name) else args.limit,
                         "sampling": eval_identity(settings[kinds[name]]),
                         "pass_k": code_k if kinds[name] == "code" else None,
                         "data": heldout.describe(name) if is_heldout(name) else sources[name]}
                  for name in args.benchmarks}
    samples = Path(args.out) / ".samples"  # each benchmark's journal, and their one lock
    with contextlib.ExitStack() as stack:
        try:  # one l2t eval writes into --out at a time: a second would append to the same journals and reports
            stack.enter_context(held(samples / ".lock", f"l2t eval --out {args.out}"))
        except JournalInUse as exc:
            raise SystemExit(f"l2t eval --out: another evaluation writes into {args.out} now ({exc}); wait for it "
                             "to finish, or choose another --out") from None
        try:  # again, now that no other evaluation can write there: one may have finished since the first check
            check_report_dir(args.out, model=args.model, benchmarks=list(args.benchmarks))
            results = finished_results(args.out, identities)
        except ReportDirError as exc:
            raise SystemExit(f"l2t eval --out: {exc}") from None
        for name in results:
            logging.getLogger("l2t.eval").info("%s: finished in %s before, with these settings; kept", name,
                                               args.out)
        todo = {name: its for name, its in items.items() if name not in results}
        engine, tok = (load_engine(args.engine, args.model, args.device,
                                   gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                   max_model_len=args.vllm_max_model_len) if todo else (None, None))
        for name, its in todo.items():
            # each engine call's samples kept as made: a crash resumes from them (l2t_core.eval.journal)
            journal = SampleJournal(samples / f"{name}.jsonl", context={"model": model_weights, "device": args.device})
            if kinds[name] == "code":
                results[name] = evaluate_code(engine, tok, its, settings["code"], k_values=code_k,
                                              workers=args.sandbox_workers, show_progress=not args.quiet,
                                              journal=journal)
            else:
                results[name] = evaluate_math(engine, tok, its, settings["math"], show_progress=not args.quiet,
                                              journal=journal)
                if is_heldout(name):  # which held-out problems: recorded in report.json, named in the report
                    results[name].summary["heldout"] = heldout.describe(name)
                else:  # which file: the data directory's, or the hub copy (report.json)
                    results[name].summary["source"] = sources[name]
            results[name].summary["evaluation"] = identities[name]
            # the report of every benchmark done so far: a failure later keeps their samples and scores
            report = write_report(args.out, {n: results[n] for n in args.benchmarks if n in results},
                                  model=args.model)
            journal.remove()
        results = {n: results[n] for n in args.benchmarks}
        if not todo:  # every benchmark was reported before: the report once more, as this run's output
            report = write_report(args.out, results, model=args.model)
        print(json.dumps({"out": args.out, "files": report["files"],
                          "pass@1": {n: r.summary["pass@1"] for n, r in results.items()},
                          "pass@k": {n: {k: v for k, v in r.summary.items() if k.startswith("pass@") and k != "pass@1"}
                                     for n, r in results.items() if kinds[n] == "code"}}))
    return 0


def cmd_pool(args) -> int:
    """Pool the seeds of several miniature reports of one experiment (warm-start builds as blocks)."""
    from .pooling import pool_directories

    try:
        pool_directories(args.reports, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"l2t {e}") from None  # the messages start with "pool: "
    print((Path(args.out) / "pooled.md").read_text())
    return 0


def cmd_traces(args) -> int:
    """Worked solutions of a math JSONL file as METHOD.md §8 traces for ``l2t sft``."""
    from .data import read_math_file
    from .eval.datasets import DatasetError
    from .sft import SFTDataError, sft_data_path
    from .traces import traces, write_jsonl

    try:
        rows = read_math_file(sft_data_path(args.source))
    except (SFTDataError, DatasetError) as exc:
        raise SystemExit(f"l2t traces: {exc}") from None
    out, outcomes = traces(rows, args.split, args.max_episodes, args.limit)
    if not out:
        raise SystemExit(f"l2t traces: no row of {args.source} gives a trace ({dict(outcomes)}); it needs worked "
                         "'solution' texts (e.g. gsm8k_train.jsonl; math_train_answers.jsonl has none)")
    write_jsonl(out, args.out)  # an existing file: FileExistsError, one line from main()
    print(json.dumps({"out": args.out, "traces": len(out), "rows": dict(sorted(outcomes.items()))}))
    return 0


def cmd_compare(args) -> int:
    """Fig. 2-style comparison of several `l2t eval` reports against a base model."""
    from .eval.compare import ReportError, compare_reports

    try:
        res = compare_reports(args.reports, args.out, base=args.base, names=args.names)
    except ReportError as exc:
        raise SystemExit(f"l2t compare: {exc}") from None
    print(json.dumps({"out": args.out, "files": res["files"], "plots": res["plots"], "base": res["base"],
                      "average": {r["model"]: {k: r[k] for k in ("pass@1", "mean_tokens", "token_ratio")}
                                  for r in res["average"]}}))
    return 0


def _named_models(specs: list[str], command: str = "reads") -> dict[str, str]:
    """``NAME=DIR`` pairs of ``l2t reads --model`` (and ``guess-trust``), in order; a bare DIR is
    named by its position."""
    out: dict[str, str] = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (f"model{i}", spec)
        if not name or not path:
            raise SystemExit(f"l2t {command}: --model {spec!r}: write NAME=DIR (e.g. base=runs/sft)")
        if name in out:
            raise SystemExit(f"l2t {command}: the name {name!r} is given twice; give each --model its own name")
        out[name] = path
    return out


def _check_output_file(path: str, what: str) -> None:
    """Refuse (SystemExit naming ``what``), before any compute, an output file that could not be
    written at the end: a directory, or one whose nearest existing parent is no writable directory."""
    target = Path(path)
    if target.is_dir():
        raise SystemExit(f"l2t {what}: {path} is a directory; give a file name (e.g. {target / 'result.json'})")
    why = cannot_create(target.parent)
    if why:
        raise SystemExit(f"l2t {what}: cannot write {path}: {why}")


def cmd_reads(args) -> int:
    """Teacher-forced reading of the walk's steps, every model on every model's samples."""
    import torch

    from .models import load_policy
    from .reading import DEFAULT_ABLATIONS, context_or_weights
    from .warmstart import held_out

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = _named_models(args.model)
    if args.out:  # before any model loads: the result is written only at the end
        _check_output_file(args.out, "reads --out")
    try:
        problems = held_out(args.levels, args.per_level)
    except ValueError as exc:
        raise SystemExit(f"l2t reads --levels/--per-level: {exc}") from None
    loaded = {name: load_policy(path) for name, path in paths.items()}
    vocabs = {name: tok.get_vocab() for name, (_, tok) in loaded.items()}
    first = next(iter(vocabs))
    if any(v != vocabs[first] for v in vocabs.values()):
        raise SystemExit("l2t reads: the models do not share one tokenizer; compare checkpoints of one warm start")
    res = context_or_weights({name: m for name, (m, _) in loaded.items()}, loaded[first][1], problems,
                             n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, ablate=DEFAULT_ABLATIONS if args.ablate else ())
    res["models"] = paths
    res["levels"] = list(args.levels)
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=1))
    def r5(x):  # None: no tagged walk step was read
        return None if x is None else round(x, 5)

    print(json.dumps({"out": args.out, "p_wrong": {r: {s: r5(c["p_wrong"]) for s, c in row.items()}
                                                   for r, row in res["matrix"].items()},
                      "sampled_misread": {n: r5(v["misread"]) for n, v in res["samplers"].items()},
                      "ablation": {n: {k: r5(c["p_wrong"]) for k, c in a.items()}
                                   for n, a in res.get("ablation", {}).items()}}))
    unread = [n for n, v in res["samplers"].items() if not v["steps"]]
    if unread:
        logging.getLogger("l2t.reads").warning(
            "no tagged walk step to read in the samples of %s (faults: %s): their misread and p_wrong are null, "
            "not 0; check that the models are walk-task checkpoints, or raise --max-new-tokens",
            ", ".join(unread), "; ".join(f"{n} {res['samplers'][n]['faults']}" for n in unread))
    return 0


def cmd_step_gains(args) -> int:
    """Does the fitting gain tell a wrong hard step from a right one in a run's training rollouts?"""
    from .episode_credit import rollout_step_gains, step_gain_sentence

    first, last = args.steps if args.steps else (1, None)
    for run in args.runs:
        try:
            res = rollout_step_gains(run, first, last, task=args.task)
        except ValueError as e:
            raise SystemExit(f"l2t step-gains: {e}") from None
        res["reading"] = step_gain_sentence(res)
        print(json.dumps(res))
    return 0


def cmd_credit(args) -> int:
    """The credit probe on one model: the same sampled walk responses scored by L2T under each J
    estimator and/or by every method and variant of a miniature config."""
    import torch

    from .config import RewardConfig
    from .episode_credit import credit_by_kind, step_gain_sentence
    from .models import load_policy
    from .tasks import walk

    if getattr(args, "set", None) and not args.config:
        raise SystemExit("l2t credit --set: overrides apply to a miniature config, and no --config was given; "
                         "pass --config FILE with them, or use the probe's own flags")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {}
    if args.config:  # every method and variant of a miniature config, as its runs train
        from .miniature import MiniatureConfig, probe_configs

        configs = probe_configs(build_config(MiniatureConfig, args, {}), args.model)
    fitting = {"mc_samples": args.mc_samples, "mc_temperature": args.temperature,
               "continuation_budget": args.max_new_tokens}
    estimators = list(dict.fromkeys(args.estimator or ([] if configs else ["answer_logprob", "continuation"])))
    for est in estimators:
        if est in configs:
            raise SystemExit(f"l2t credit: --estimator {est} is also a method or variant name in {args.config}")
        configs[est] = ("l2t", RewardConfig(fitting={**fitting, "estimator": est}))
    try:
        problems = walk.dataset(args.problems, args.min_steps, args.max_steps, seed=args.seed + 7)
    except ValueError as exc:  # a step range the task does not have: before the model loads
        raise SystemExit(f"l2t credit --min-steps/--max-steps: {exc}") from None
    model, tok = load_policy(args.model)
    rep = credit_by_kind(model, tok, problems, configs, group_size=args.group_size, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, seed=args.seed)  # one set of samples, scored by each
    for name, (method, _) in configs.items():
        m = rep["methods"][name]
        line = {"name": name, "method": method, "responses": rep["responses"], "accuracy": rep["accuracy"],
                "tagged_share": rep["tagged_share"], "step_advantage": m["step_advantage"],
                "copy_separation": rep["copy_separation"]}  # of the samples, the same on every line
        if name in estimators:
            line["estimator"] = name
        if "step_gain" in m:  # the l2t family
            line.update(step_gain=m["step_gain"], reading=step_gain_sentence(m["step_gain"]),
                        gain_by_kind={k: {"n": v["n"], "gain": v["gain"]} for k, v in m["per_kind"].items()},
                        gain_separation=m["gain_separation"])
        if m["penalty_separation"] is not None:  # methods that charge the compression penalty
            line.update(penalty_separation=m["penalty_separation"],
                        penalty_by_kind={k: {"mean": v["penalty_hat"], "median": v["penalty_hat_median"]}
                                         for k, v in m["per_kind"].items()})
        print(json.dumps({**line, "reward_seconds": m["reward_seconds"]}))
    return 0


def _walk_probe(args, command: str, probe) -> int:
    """Run ``probe(model, tokenizer, problems) -> dict`` for every ``--model`` on the same held-out
    walk problems; one JSON line per model."""
    import torch

    from .models import load_policy
    from .tasks import walk

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        problems = walk.dataset(args.problems, args.min_steps, args.max_steps, seed=args.seed, split="heldout")
    except ValueError as exc:  # a step range the task does not have: before any model loads
        raise SystemExit(f"l2t {command} --min-steps/--max-steps: {exc}") from None
    for name, path in _named_models(args.model, command).items():
        model, tok = load_policy(path)
        try:
            res = probe(model, tok, problems)
        except ValueError as e:
            raise SystemExit(f"l2t {command}: {e}") from None
        print(json.dumps({"model": name, "path": path, **res}))
    return 0


def cmd_guess_trust(args) -> int:
    """Whom each model's forced-answer readout J believes right after an unchecked hard step."""
    from .episode_credit import guess_trust, guess_trust_sentence

    def probe(model, tok, problems) -> dict:
        res = guess_trust(model, tok, problems, seed=args.seed)
        return {**res, "reading": guess_trust_sentence(res)}

    return _walk_probe(args, "guess-trust", probe)


def cmd_check_odds(args) -> int:
    """How each model decides to check right after an easy and after a hard step."""
    from .episode_credit import check_decisions

    return _walk_probe(args, "check-odds", lambda model, tok, problems: check_decisions(
        model, tok, problems, seed=args.seed, gradients=args.gradients, context=args.context))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="l2t", description="L2T reinforcement fine-tuning")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="RL fine-tuning of a policy (grpo, length_penalty, mrt, l2t, ...)")
    _common(p)
    p.add_argument("--policy", help="HF directory or hub id of the initial policy")
    p.add_argument("--policy-revision", help="for a hub id: the branch, tag or commit to load (a commit is reproducible)")
    p.add_argument("--method", help="grpo | length_penalty | mrt | l2t | l2t_no_penalty | l2t_random_layers")
    p.add_argument("--out", help="run directory (local path or fsspec URL)")
    p.add_argument("--steps", type=int, help="RL steps of the whole run (the lr schedule spans them; resuming needs the same value)")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("warmstart", help="build the synthetic task, tokenizer and tiny model, and SFT it")
    _common(p)
    p.add_argument("--out", required=True, help="directory for the SFT checkpoint")
    p.set_defaults(fn=cmd_warmstart)

    p = sub.add_parser("sft", help="supervised fine-tuning of a policy on reasoning traces (a JSONL file of "
                                   "problem/prompt and response) before RL; writes an HF model directory")
    _common(p)
    p.add_argument("--model", help="HF directory or hub id of the model to fine-tune")
    p.add_argument("--model-revision", help="for a hub id: the branch, tag or commit to fine-tune")
    p.add_argument("--data", help="JSONL file of traces (a path, or a file name in L2T_DATA_DIR)")
    p.add_argument("--out", help="directory for the fine-tuned model (must not exist)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # as for train
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("traces", help="the worked solutions of a math JSONL file (e.g. gsm8k_train.jsonl) as "
                                      "episode-tagged METHOD.md §8 traces, the rows `l2t sft` trains on")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging")
    p.add_argument("source", help="math JSONL with 'solution' texts: a path, or a file name in L2T_DATA_DIR")
    p.add_argument("--out", required=True, help="JSONL file to write (must not exist)")
    p.add_argument("--split", choices=["lines", "paragraphs"], default="lines",
                   help="one episode per non-empty line (GSM8K) or per blank-line-separated paragraph")
    p.add_argument("--max-episodes", type=positive_int, default=30, help="skip solutions with more steps")
    p.add_argument("--limit", type=positive_int, help="at most this many traces")
    p.set_defaults(fn=cmd_traces)

    p = sub.add_parser("miniature", help="the CPU miniature of the paper's headline experiment")
    _common(p)
    p.add_argument("--out", required=True, help="directory for miniature.json, the table and plots")
    p.add_argument("--methods", nargs="+", help="methods to compare (default: grpo length_penalty l2t)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2)")
    p.set_defaults(fn=cmd_miniature)

    from .eval.datasets import heldout_benchmark_names  # a light import: names, no data

    p = sub.add_parser("eval", help="evaluate a model on math benchmarks and the synthetic held-out sets "
                       "(pass@1, maj@4) and HumanEval (pass@1, pass@k): tokens, report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--model", required=True, help="HF directory or hub id")
    p.add_argument("--benchmarks", nargs="+", default=["math500"],
                   help="names from l2t_core.eval.datasets, or a synthetic task's held-out split: "
                        f"{', '.join(heldout_benchmark_names())} (l2t_core.eval.synthetic)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--n", type=int, help="samples per problem (default, METHOD.md §7: 20 for math, 64 for HumanEval)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=positive_int, default=16384)
    p.add_argument("--limit", type=positive_int, help="first N problems of each file benchmark (not the held-out sets: "
                   "see --heldout-per-level)")
    p.add_argument("--heldout-levels", type=int, nargs="+", metavar="LEVEL",
                   help="levels of the synthetic held-out benchmarks (default: all, 1-6)")
    p.add_argument("--heldout-per-level", type=int, default=50,
                   help="held-out problems per level, at most (a level with fewer gives all of its own; default 50)")
    p.add_argument("--heldout-seed", type=int, help="seed of the held-out draw (default: the task's HELDOUT_SEED)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--device", default="cpu", help="where the hf engine runs (vLLM runs on the GPU)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9,
                   help="vllm engine: share of the GPU's memory it takes (default 0.9: evaluation has the GPU to itself)")
    p.add_argument("--vllm-max-model-len", type=positive_int,
                   help="vllm engine: longest prompt + response it holds (default: the model's context length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-workers", type=positive_int, default=1)
    p.add_argument("--verify-timeout", type=float, default=5.0,
                   help="seconds one answer check may take (math-verify); one that runs out counts as wrong and "
                        "is counted in the report's statuses")
    p.add_argument("--prompts-per-call", type=positive_int, default=64,
                   help="problems per engine call; each call's samples are kept as made, so a rerun after a crash "
                        "resumes after the last call done (the same samples: a call's seed is seed + its start)")
    p.add_argument("--pass-k", type=int, nargs="+", metavar="K",
                   help="HumanEval pass@k values, each in [1, n] (default: 1 and n)")
    p.add_argument("--sandbox-workers", type=positive_int, help="HumanEval programs run at once (default: CPU count)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("reads", help="does a policy misread the walk because of its weights or of the contexts it "
                       "writes? every model, teacher-forced, reads every model's level samples")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a checkpoint of the walk task (repeat the flag; all from one warm start)")
    p.add_argument("--levels", type=int, nargs="+", default=[6], metavar="LEVEL", help="held-out levels (default 6)")
    p.add_argument("--per-level", type=positive_int, default=60, help="held-out problems per level (default 60)")
    p.add_argument("--n", type=positive_int, default=8, help="samples per problem and model (default 8)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=positive_int, default=448)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch threads")
    p.add_argument("--ablate", action="store_true",
                   help="also read each model's own samples with its repeats, its restatements, and both cut out "
                        "(are those episodes memory aids?)")
    p.add_argument("--out", help="JSON file for the full result")
    p.set_defaults(fn=cmd_reads)

    p = sub.add_parser("step-gains", help="in a run's logged training rollouts (an l2t-family method), the "
                       "fitting gain G_k of hard steps written wrong minus those written right, same prompt and "
                       "move, and each episode kind's mean G_k, penalty P̂_k and process reward r_k")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories of `l2t train` (local path or fsspec URL)")
    p.add_argument("--steps", type=int, nargs=2, metavar=("FIRST", "LAST"), help="training steps to read (default: all)")
    p.add_argument("--task", choices=["walk", "arithmetic"], default="walk", help="the synthetic task of the run")
    p.set_defaults(fn=cmd_step_gains)

    p = sub.add_parser("credit", help="sample a model's walk responses (levels min..max steps) and score them with "
                       "L2T under each J estimator, or under each method and variant of a miniature config (same "
                       "samples for all): mean G_k per episode kind, whether G_k tells a wrong hard step from a "
                       "right one, what each update teaches a wrong hard step against a right one, and whether the "
                       "penalty and the fitting gain tell redundant episodes from useful ones (AUC)")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
    p.add_argument("--model", required=True, help="a checkpoint of the walk task")
    p.add_argument("--estimator", action="append", choices=["answer_logprob", "monte_carlo", "continuation"],
                   help="score under l2t with this fitting.estimator (repeat the flag; default without --config: "
                        "answer_logprob and continuation)")
    p.add_argument("--config", help="a `l2t miniature` config (JSON/YAML): score under each of its methods and "
                   "variants as its runs train them (train_overrides and the variant's overrides applied); the "
                   "sampling settings come from the flags below")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override of --config, repeatable")
    p.add_argument("--problems", type=positive_int, default=24, help="problems (default 24, as the miniature's probe)")
    p.add_argument("--min-steps", type=positive_int, default=4)
    p.add_argument("--max-steps", type=positive_int, default=6)
    p.add_argument("--group-size", type=positive_int, default=8, help="samples per problem (default 8)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling (and continuation) temperature")
    p.add_argument("--max-new-tokens", type=positive_int, default=448, help="response budget (also the continuations')")
    p.add_argument("--mc-samples", type=positive_int, default=2, help="samples per boundary (monte_carlo, continuation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch threads")
    p.set_defaults(fn=cmd_credit, estimator=None)

    def walk_probe_args(p, min_steps: int) -> None:
        p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
        p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                       help="a checkpoint of the walk task (repeat the flag for several)")
        p.add_argument("--problems", type=positive_int, default=120, help="held-out walk problems (default 120)")
        p.add_argument("--min-steps", type=positive_int, default=min_steps,
                       help=f"fewest moves of a problem (default {min_steps})")
        p.add_argument("--max-steps", type=positive_int, default=6, help="most moves of a problem (default 6)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=positive_int, help="torch threads")

    p = sub.add_parser("guess-trust", help="right after an unchecked hard step of the walk, does the model's "
                       "readout J believe the written result or repair it as the typical mistake? (why the fitting "
                       "gain can pay for wrong guesses)")
    walk_probe_args(p, 4)
    p.set_defaults(fn=cmd_guess_trust)

    p = sub.add_parser("check-odds", help="right after an easy and after a hard step of the walk, the model's "
                       "log-odds of writing a check, and with --gradients how far lowering one moves the other "
                       "(can a policy drop the easy checks and keep the hard ones?)")
    walk_probe_args(p, 3)
    p.add_argument("--gradients", action="store_true",
                   help="also the cosine of the two decisions' mean gradients and the first-order transfer")
    p.add_argument("--context", choices=["mixed", "necessary"], default="mixed",
                   help="the traces cut: each step checked with probability 1/2 (mixed) or only the hard ones")
    p.set_defaults(fn=cmd_check_odds)

    p = sub.add_parser("pool", help="pool the seeds of several `l2t miniature` reports of one experiment "
                                    "(seeds added later, on the same or a rebuilt warm start)")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
    p.add_argument("reports", nargs="+", metavar="DIR", help="directories written by `l2t miniature` (two or more)")
    p.add_argument("--out", required=True, help="directory for pooled.json and pooled.md")
    p.set_defaults(fn=cmd_pool)

    p = sub.add_parser("compare", help="compare `l2t eval` reports of several models (Fig. 2 style)")
    p.add_argument("-q", "--quiet", action="store_true", help="less logging, no progress bars")
    p.add_argument("--reports", nargs="+", required=True, metavar="DIR", help="report directories of `l2t eval`")
    p.add_argument("--names", nargs="+", help="one name per report (default: each report's model)")
    p.add_argument("--base", help="name of the base model for token ratios (default: the first report)")
    p.add_argument("--out", required=True, help="directory for comparison.json/.md/.html and the plots")
    p.set_defaults(fn=cmd_compare)

    args = ap.parse_args(argv)
    refuse_credentials_in_args(args)
    if args.quiet:
        quiet_progress_bars()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except OSError as exc:
        # the environment, not the code: a path that holds no model (l2t_core.models.ModelLoadError,
        # raised before any compute) or data file, a run directory that cannot be written, a storage
        # or hub error; the message names it: one line, no traceback
        raise SystemExit(f"l2t {args.command}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
