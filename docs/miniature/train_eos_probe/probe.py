"""p(EOS) where a sampled response stops, and the largest p(EOS) before it, at the sampling
temperature (0.7): how much gradient `reward.loss.train_eos` can give the stop token.

Usage (repository root): PYTHONPATH=. python docs/miniature/train_eos_probe/probe.py MODEL_DIR [n_problems]
MODEL_DIR: a warm start (`l2t warmstart` / `l2t miniature`'s `sft/`) or a checkpoint of the walk task.
Writes one JSON object to stdout (concise_rebuilt_base.json is its output on the rebuilt concise base)."""
import json, sys
import torch
from l2t_core.models import load_policy
from l2t_core.tasks import get_task
from l2t_core.warmstart import generate

model_dir = sys.argv[1]; n_prob = int(sys.argv[2]) if len(sys.argv) > 2 else 48
T = 0.7
torch.set_num_threads(1)
model, tok = load_policy(model_dir)
task = get_task("walk")
probs = task.dataset(n_prob, 1, 6, seed=12345, hard_prob=0.5)
outs = generate(model, tok, probs, max_new_tokens=448, n=8, temperature=T, top_p=1.0, seed=7, batch_size=64)
eos = tok.eos_token_id
final, before, unfinished, n = [], [], 0, 0
with torch.no_grad():
    for group in outs:
        for c in group:
            n += 1
            if not c.finished:
                unfinished += 1
                continue
            ids = torch.tensor([c.prompt_ids + c.response_ids])
            logits = model(ids).logits[0].float() / T
            lp = torch.log_softmax(logits, -1)[:, eos].exp()
            P = len(c.prompt_ids)
            resp = lp[P - 1:]  # p(EOS) before each response token and after the last one
            final.append(resp[-1].item())
            before.append(resp[:-1].max().item() if len(resp) > 1 else 0.0)
final_t, before_t = torch.tensor(final), torch.tensor(before)
print(json.dumps({"model": model_dir, "responses": n, "unfinished": unfinished,
                  "p_eos_at_stop_mean": final_t.mean().item(), "p_eos_at_stop_min": final_t.min().item(),
                  "one_minus_p_at_stop_mean": (1 - final_t).mean().item(),
                  "p_eos_before_stop_max_mean": before_t.mean().item(), "p_eos_before_stop_max_max": before_t.max().item()}, indent=1))
