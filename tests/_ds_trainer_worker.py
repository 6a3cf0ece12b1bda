"""Worker for tests/test_deepspeed.py: the real Trainer on one rank.

``torchrun --nproc_per_node 2 tests/_ds_trainer_worker.py CFG_JSON OUT [VARIANT]`` makes every rank
run ``Trainer(cfg).run()`` (cfg: a TrainConfig as JSON, with ``engine="deepspeed"``) into the shared
run directory of the config; ``CFG_JSON OUT [VARIANT] + CFG_JSON OUT [VARIANT] ...`` runs several
Trainers, one after the other, in one launch (each launch costs seconds of imports). Each rank then
writes to OUT:

* ``rank<r>.json``: its rank, world size, final step, returned checkpoint, a sha256 digest of its
  final weights (every state-dict tensor as float32, in name order) and whether its reference
  policy is ZeRO-3 partitioned;
* ``rollouts-rank<r>.pkl``: ``{step: (rollouts, problems)}``, the rank's share of every step as
  ``Trainer._rollouts`` returned it, so the test can replay the whole batch in one process.

A third argument ``uneven`` cuts rank 1's responses to their first token, so its sequences are
shorter and it has fewer micro-batches than rank 0 in the reference pass and the update;
``upload-fails`` makes rank 1's upload of its engine shard of step 2 fail as a full disk would
(object-store run directories, :mod:`l2t_core.sharded_checkpoint`), after writing the digest of its
step-2 weights to ``rank1-failed.json`` (the launch fails there: launch it alone).

Like ``l2t train`` under ``deepspeed``/``torchrun``, it does not set up the process group itself:
the Trainer (its DeepSpeed engine) must.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch


def weights_digest(module: torch.nn.Module) -> str:
    from l2t_core.engines.gather import full_state_dict

    h = hashlib.sha256()
    for name, t in sorted(full_state_dict(module).items()):  # whole weights, also under ZeRO-3
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def main(cfg_path: str, out: str, variant: str = "") -> None:
    torch.set_num_threads(1)
    from l2t_core.config import TrainConfig
    from l2t_core.engines.gather import is_partitioned
    from l2t_core.trainer import Trainer

    cfg = TrainConfig.model_validate_json(Path(cfg_path).read_text())
    if variant == "upload-fails" and os.environ.get("RANK") == "1":
        from l2t_core.checkpoint import RunStorage

        upload = RunStorage.upload_into_checkpoint

        def failing_upload(self, step, local):
            if step == 2:  # the weights this session ends with, for the resumed run to match (ZeRO-2:
                # whole weights on every rank; under ZeRO-3 this gather would need every rank)
                (Path(out) / "rank1-failed.json").write_text(json.dumps({"digest": weights_digest(tr.engine.unwrapped())}))
                raise OSError(28, "No space left on device (injected on rank 1)")
            return upload(self, step, local)

        RunStorage.upload_into_checkpoint = failing_upload
    tr = Trainer(cfg, show_progress=False)
    seen = {}
    original = tr._rollouts

    def recording_rollouts(step):
        rollouts, probs, t = original(step)
        if variant == "uneven" and tr.rank == 1:
            import dataclasses

            rollouts = [dataclasses.replace(r, response_ids=list(r.response_ids[:1]),
                                            response_text=tr.tokenizer.decode(r.response_ids[:1], skip_special_tokens=True))
                        for r in rollouts]
        seen[step] = (rollouts, probs)
        return rollouts, probs, t

    tr._rollouts = recording_rollouts
    res = tr.run()
    rank = tr.rank
    (Path(out) / f"rollouts-rank{rank}.pkl").write_bytes(pickle.dumps(seen))
    info = {"rank": rank, "world": tr.world, "final_step": res.final_step, "checkpoint": res.checkpoint,
            "steps_run": sorted(seen),
            "digest": weights_digest(tr.engine.unwrapped()),
            "reference_partitioned": is_partitioned(tr.reference.parameters()) if tr.reference is not None else None}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    import torch.distributed as dist

    dist.barrier()


if __name__ == "__main__":
    runs, run = [], []
    for arg in sys.argv[1:] + ["+"]:
        if arg == "+":
            runs.append(run)
            run = []
        else:
            run.append(arg)
    for args in runs:
        main(*args)
    os._exit(0)
