"""Worker for tests/test_deepspeed.py's ``l2t sft`` tests: :func:`~l2t_core.sft.run_sft` on one rank.

``torchrun --nproc_per_node 2 tests/_ds_sft_worker.py CFG_JSON OUT [DIE_IN_STEP]`` makes every rank run
``run_sft(cfg)`` (cfg: an SFTConfig as JSON, with ``engine="deepspeed"``), as ``l2t sft`` under
``deepspeed``/``torchrun`` does: the job joins the process group itself. Each rank then writes
``rank<r>.json`` to OUT with its rank and a sha256 digest of its final weights (every state-dict tensor
as float32, in name order, gathered whole under ZeRO-3).

With DIE_IN_STEP every rank raises KeyboardInterrupt (as a kill would) when that step's batch starts,
after the checkpoints before it, and exits non-zero. With ``final`` instead, rank 0 fails to write the
finished model (``save_pretrained`` raises OSError, as on a full disk) and every rank must exit
non-zero at once, not wait for rank 0 until the process group times out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(cfg_path: str, out: str, die_in_step: str = "") -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    import l2t_core.sft as sft
    from _ds_trainer_worker import weights_digest

    cfg = sft.SFTConfig.model_validate_json(Path(cfg_path).read_text())
    trained, calls = [], []
    real_encoded, real_batch = sft.sft_encoded, sft._accumulate_batch

    def recording(model, *a, **k):  # the module every rank trained
        trained.append(model)
        return real_encoded(model, *a, **k)

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == int(die_in_step):
            raise KeyboardInterrupt
        return real_batch(*a, **k)

    sft.sft_encoded = recording
    if die_in_step == "final":
        from transformers import PreTrainedModel

        real_save = PreTrainedModel.save_pretrained

        def full_disk(self, path, *a, **k):
            if dist.get_rank() == 0 and Path(path).name == "final":
                raise OSError(28, "No space left on device")
            return real_save(self, path, *a, **k)

        PreTrainedModel.save_pretrained = full_disk
    elif die_in_step:
        sft._accumulate_batch = dying
    try:
        sft.run_sft(cfg, show_progress=False)
    except (KeyboardInterrupt, OSError, RuntimeError) as exc:
        print(f"rank {os.environ.get('RANK')}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
    rank = dist.get_rank()
    info = {"rank": rank, "world": dist.get_world_size(), "digest": weights_digest(trained[0])}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(*sys.argv[1:])
    os._exit(0)
