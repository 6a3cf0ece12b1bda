"""`l2t sft`: supervised fine-tuning of any policy on a JSONL file of traces (l2t_core.sft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2t_core.sft import (SFTConfig, SFTDataError, _accumulate_batch, check_traces, encode_pairs, eval_loss,
                          read_sft_jsonl, run_sft)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _trace(a: int, b: int) -> str:
    return (f"<think>\n<episode_1>We add {a} and {b} to get {a + b}.</episode_1>\n"
            f"<episode_2>Check: {a + b} - {b} = {a}.</episode_2>\n</think>\n\nThe answer is \\boxed{{{a + b}}}")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = 12) -> list[dict]:
    return [{"id": f"r{i}", "problem": f"Compute {i} + {i + 2}.", "response": _trace(i, i + 2), "answer": str(2 * i + 2)}
            for i in range(n)]


def test_micro_batches_give_the_whole_batch_gradient(tiny):
    """Passes of 1, 2 or 3 examples, each weighted by its share of the batch's trained tokens,
    give the gradient of one pass over the whole batch (examples of different lengths, so an
    unweighted mean of the passes' losses would not)."""
    model, tok = tiny
    batch = encode_pairs(tok, [("Compute 1 + 2.\n", _trace(1, 2)), ("p\n", "<think>x</think> \\boxed{3}"),
                               ("Compute 10 + 22 now.\n", _trace(10, 22) * 2), ("q\n", "ok")])
    pad = tok.pad_token_id
    grads, losses = {}, {}
    for size in (None, 1, 2, 3):
        model.zero_grad()
        losses[size] = _accumulate_batch(model, batch, pad, size)
        grads[size] = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for size in (1, 2, 3):
        assert losses[size] == pytest.approx(losses[None], rel=1e-5)
        for g, ref in zip(grads[size], grads[None]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_keeps_fp32_weights_and_gradients_near_fp32(tiny):
    """precision bf16: the forward runs in bfloat16 under torch.autocast (its loss differs from
    fp32's by bf16 rounding, not more), the gradients land in the fp32 weights' own dtype and
    point the same way; an unknown precision is refused."""
    model, tok = tiny
    batch = encode_pairs(tok, [("Compute 1 + 2.\n", _trace(1, 2)), ("Compute 10 + 22 now.\n", _trace(10, 22))])
    out = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        loss = _accumulate_batch(model, batch, tok.pad_token_id, 1, precision)
        out[precision] = loss, torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert l16 != l32 and abs(l16 - l32) < 0.02 * l32
    assert g16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert eval_loss(model, batch, tok.pad_token_id, 2, "bf16") == pytest.approx(l32, rel=0.02)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        _accumulate_batch(model, batch, tok.pad_token_id, 1, "fp16")


def test_render_prompt_tokenises_to_encode_prompt(tokenizer):
    """With a chat template, the rendered prompt tokenises to encode_prompt's ids (the context the
    trainer samples in); without one the prompt is the text itself."""
    from transformers import PreTrainedTokenizerFast

    from l2t_core.prompts import build_prompt, encode_prompt, render_prompt

    text = build_prompt("Compute (3 + 4) * 2.")
    assert render_prompt(tokenizer, text) == text
    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    rendered = render_prompt(chat, text)
    assert rendered == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    direct = chat.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct  # BatchEncoding in newer transformers
    assert encode_prompt(chat, text) == list(direct) == chat(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_sft_job_trains_and_writes_a_policy_directory(tiny_dir, tmp_path, monkeypatch):
    """The whole job on the tiny model: the traces are checked (segmentation, answers), tokenised
    once, the model learns them (held-out loss falls), and out holds a loadable policy with its
    config and report, with no staging directory left beside it."""
    import l2t_core.sft as sft_module
    from l2t_core.models import load_policy

    encoded = []
    encode = sft_module.encode_pairs
    monkeypatch.setattr(sft_module, "encode_pairs", lambda tok, pairs: encoded.append(len(pairs)) or encode(tok, pairs))

    rows = _rows(12)
    rows[3]["answer"] = "999"  # a trace that ends in another answer: counted, and trained on all the same
    rows[5]["response"] = "no tags here \\boxed{12}"
    del rows[5]["answer"]
    rows[7] = {"prompt": "Add 7 and 9.", "response": _trace(7, 9)}
    data = _write(tmp_path / "traces.jsonl", rows)
    cfg = SFTConfig(model=str(tiny_dir), data=str(data), out=str(tmp_path / "sft"), steps=30, batch_size=4,
                    lr=3e-3, eval_size=2, device="cpu")
    out = run_sft(cfg, show_progress=False)
    assert out == tmp_path / "sft"
    report = json.loads((out / "sft_report.json").read_text())
    assert report["segmentation"] == {"fallback": 1, "tagged": 11}
    assert report["answers"] == {"checked": 10, "correct": 9, "wrong_ids": ["r3"]}
    assert check_traces(read_sft_jsonl(data), check_answers=False)["answers"] == {
        "checked": 0, "correct": 0, "wrong_ids": []}
    assert report["examples"] == 10 and report["eval_examples"] == 2
    assert encoded == [10, 2]  # the checks' encoding is the one trained on
    assert report["eval_losses"][-1][1] < 0.7 * report["loss_curve"][0]
    assert SFTConfig.model_validate_json((out / "sft_config.json").read_text()) == cfg
    model, tok = load_policy(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft", "traces.jsonl"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_command_line(tiny_dir, tmp_path, capsys):
    from l2t_core.cli import main

    data = _write(tmp_path / "traces.jsonl", _rows(4))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {data}\nbatch_size: 2\ndevice: cpu\nprecision: bf16\n")
    # the deepspeed launcher appends --local_rank=N (the rank comes from the environment)
    assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / "m"), "--steps", "2", "-q", "--local_rank=0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"checkpoint": str(tmp_path / "m")}
    assert (tmp_path / "m" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match=r"l2t sft: SFT output .*/m already exists; choose another out"):
        main(["sft", "--config", str(cfg), "--out", str(tmp_path / "m"), "--steps", "2", "-q"])
    with pytest.raises(SystemExit, match=r"invalid SFTConfig:\n  out: Value error, 's3://b/m' is a URL"):
        main(["sft", "--config", str(cfg), "--out", "s3://b/m", "--print-config"])


@pytest.mark.parametrize("row, message", [
    ({"problem": "p"}, r"line 2, field 'response'.*non-empty string, got None"),
    ({"problem": "p", "prompt": "q", "response": "r"}, r"line 2.*exactly one of 'problem'.*got \['problem', 'prompt'\]"),
    ({"response": "r"}, r"line 2.*exactly one of 'problem'.*got neither"),
    ({"problem": "  ", "response": "r"}, r"line 2, field 'problem'.*non-empty string"),
    ({"problem": "p", "response": "r", "answer": ["5"]}, r"line 2, field 'answer'.*non-empty string, got \['5'\]"),
])
def test_bad_traces_are_refused_with_their_line_and_field(tmp_path, row, message):
    data = _write(tmp_path / "t.jsonl", [_rows(1)[0], row])
    with pytest.raises(SFTDataError, match=message):
        read_sft_jsonl(data)


def test_numbers_as_ids_and_answers_are_read_as_text(tmp_path):
    rows = read_sft_jsonl(_write(tmp_path / "t.jsonl", [{"id": 7, "problem": "p", "response": "r", "answer": 4}]))
    assert (rows[0].id, rows[0].answer, rows[0].line) == ("7", "4", 1)


def test_sft_job_refuses_before_any_compute(tiny_dir, tmp_path, monkeypatch):
    """Every refusal comes before the model is trained, and none leaves anything behind."""
    import l2t_core.sft as sft_module

    data = _write(tmp_path / "t.jsonl", _rows(3))
    base = dict(model=str(tiny_dir), data=str(data), out=str(tmp_path / "out"), steps=1, device="cpu")
    trained = []
    monkeypatch.setattr(sft_module, "sft_encoded", lambda *a, **k: trained.append(1))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        run_sft(SFTConfig(**{**base, "out": str(tmp_path / "taken")}))
    with pytest.raises(SFTDataError, match=r"'nope.jsonl' is no file \(nor a file in the data directory"):
        run_sft(SFTConfig(**{**base, "data": "nope.jsonl"}))
    with pytest.raises(SFTDataError, match=r"eval_size=3 holds out every one of the 3 traces"):
        run_sft(SFTConfig(**{**base, "eval_size": 3}))
    with pytest.raises(SFTDataError, match=r"3 of 3 traces are longer than max_tokens=20 .*: line 1 \(\d+ tokens\)"):
        run_sft(SFTConfig(**{**base, "max_tokens": 20}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SFTDataError, match="has no traces"):
        run_sft(SFTConfig(**{**base, "data": str(empty)}))
    copied = tmp_path / "copied.jsonl"
    copied.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[1])
    with pytest.raises(SFTDataError, match=r"copied.jsonl, line 4: the same prompt and response as line 2; remove the copy"):
        run_sft(SFTConfig(**{**base, "data": str(copied)}))
    assert not trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.jsonl", "empty.jsonl", "t.jsonl", "taken"]


@pytest.mark.parametrize("layout", ["engine", "before_engines"])
def test_a_job_killed_midway_resumes_and_ends_where_an_uninterrupted_one_does(tiny_dir, tmp_path, monkeypatch, layout):
    """A job that fails after its step-4 checkpoint keeps its work beside out (no out); run again
    it resumes there and ends with the weights and losses of an uninterrupted run, bit for bit.
    Run with another config meanwhile, it is refused naming what differs. A checkpoint written
    before the training engines (AdamW and schedule state inside state.pt) resumes the same way."""
    import l2t_core.sft as sft_module
    from safetensors.torch import load_file

    data = _write(tmp_path / "t.jsonl", _rows(10))
    base = dict(model=str(tiny_dir), data=str(data), steps=7, batch_size=3, lr=3e-3, eval_size=2, eval_every=3,
                checkpoint_every=2, device="cpu")
    whole = run_sft(SFTConfig(**base, out=str(tmp_path / "whole")), show_progress=False)

    real, calls = sft_module._accumulate_batch, []

    def dies_in_step_6(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # as a kill would, after the checkpoints of steps 2 and 4
        return real(*a, **k)

    monkeypatch.setattr(sft_module, "_accumulate_batch", dies_in_step_6)
    cfg = SFTConfig(**base, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, show_progress=False)
    monkeypatch.setattr(sft_module, "_accumulate_batch", real)
    partial = tmp_path / ".cut.partial"
    assert not (tmp_path / "cut").exists() and (partial / "checkpoint" / "state.pt").is_file()
    if layout == "before_engines":
        engine_file = partial / "checkpoint" / "engine_state.pt"
        state = torch.load(partial / "checkpoint" / "state.pt", weights_only=False)
        torch.save({**state, **torch.load(engine_file, weights_only=False)}, partial / "checkpoint" / "state.pt")
        engine_file.unlink()
    else:  # saved by two DeepSpeed ranks: a one-process job cannot take their optimizer partitions over
        state_file = partial / "checkpoint" / "state.pt"
        saved = state_file.read_bytes()
        torch.save({**torch.load(state_file, weights_only=False), "world": 2}, state_file)
        with pytest.raises(sft_module.SFTResumeError, match=r"saved by 2 rank\(s\) and this launch has 1"):
            run_sft(cfg, show_progress=False)
        state_file.write_bytes(saved)
    with pytest.raises(sft_module.SFTResumeError, match=r"\.cut\.partial holds an unfinished SFT .*differs in: lr\)"):
        run_sft(cfg.model_copy(update={"lr": 1e-3}), show_progress=False)
    out = run_sft(cfg, show_progress=False)
    assert not partial.exists()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "sft_report.json").read_text()) for d in (whole, out))
    assert rb["resumed_after_step"] == 4 and ra["resumed_after_step"] is None
    assert rb["loss_curve"] == ra["loss_curve"] and rb["eval_losses"] == ra["eval_losses"]
    if layout == "engine":
        assert rb["grad_norm_curve"] == ra["grad_norm_curve"]
    else:  # steps 1-4 were not recorded then: the mean of steps 5-7
        assert len(rb["grad_norm_curve"]) == 1 and rb["grad_norm_curve"][0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "t.jsonl", "whole"]


def test_deepspeed_settings_go_together(tmp_path):
    import l2t_core.sft as sft_module

    base = dict(model="m", data="d.jsonl", out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="engine='deepspeed' needs deepspeed_config"):
        SFTConfig(**base, engine="deepspeed")
    with pytest.raises(ValueError, match="deepspeed_config is set but engine is 'torch'"):
        SFTConfig(**base, deepspeed_config="infra/deepspeed/zero2.json")
    data = _write(tmp_path / "t.jsonl", _rows(4))
    missing = SFTConfig(**{**base, "data": str(data)}, engine="deepspeed", deepspeed_config=str(tmp_path / "no.json"))
    with pytest.raises(sft_module.SFTError, match=r"deepspeed_config '.*no.json' is no file"):
        run_sft(missing)  # before joining a process group or loading the model
    # an unfinished job resumes only with the DeepSpeed config it was started with, byte for byte
    partial = sft_module.partial_dir(tmp_path / "o")
    partial.mkdir()
    cfg = SFTConfig(**base, engine="deepspeed", deepspeed_config="ds.json")
    (partial / "sft_config.json").write_text(cfg.model_dump_json())
    (partial / "data.json").write_text(json.dumps({"sha256": "d", "deepspeed_sha256": "a"}))
    assert sft_module.stale_partial(cfg, "d", "a") is None
    assert sft_module.stale_partial(cfg, "d", "b") == "the DeepSpeed config's bytes"


def test_changed_traces_are_not_resumed(tiny_dir, tmp_path, monkeypatch):
    import l2t_core.sft as sft_module

    data = _write(tmp_path / "t.jsonl", _rows(4))
    monkeypatch.setattr(sft_module, "sft_encoded", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    cfg = SFTConfig(model=str(tiny_dir), data=str(data), out=str(tmp_path / "out"), steps=1, device="cpu")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sft(cfg)
    _write(data, _rows(5))
    with pytest.raises(sft_module.SFTResumeError, match=r"differs in: the traces' bytes"):
        run_sft(cfg)


def test_device_and_evaluation_batches(tiny_dir, tmp_path, monkeypatch):
    """A CUDA device on a machine without one is refused before the model loads (one line from the
    command line); the evaluation loss runs in passes of micro_batch_size, like training, so its
    logits fit where a training pass's do."""
    import l2t_core.sft as sft_module
    from l2t_core.cli import main

    data = _write(tmp_path / "t.jsonl", _rows(6))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {data}\ndevice: cuda\n")
    with pytest.raises(SystemExit, match=r"l2t sft: device: device='cuda' but no CUDA device is available"):
        main(["sft", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"])
    batches = []
    real = sft_module.eval_loss
    monkeypatch.setattr(sft_module, "eval_loss", lambda m, e, p, b, *a: batches.append(b) or real(m, e, p, b, *a))
    run_sft(SFTConfig(model=str(tiny_dir), data=str(data), out=str(tmp_path / "o"), steps=2, batch_size=4,
                      micro_batch_size=3, eval_size=2, device="cpu"), show_progress=False)
    assert batches == [3]


def test_data_is_found_in_the_data_directory(tmp_path, monkeypatch):
    from l2t_core.sft import sft_data_path

    monkeypatch.setenv("L2T_DATA_DIR", str(tmp_path))
    _write(tmp_path / "mine.jsonl", _rows(1))
    assert sft_data_path("mine.jsonl") == tmp_path / "mine.jsonl"
    with pytest.raises(SFTDataError, match="no file"):
        sft_data_path("sub/mine.jsonl")
