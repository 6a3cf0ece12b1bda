"""Whole weights of a model outside DeepSpeed (what ZeRO-3 gathers is tested in test_deepspeed.py):
the helpers read a plain module's state dict as it is, tied weights and buffers included."""

from __future__ import annotations

import torch

import pytest

from l2t_core.engines.gather import check_head_chunking, full_named_tensors, full_state_dict, gathered, is_partitioned


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as lm_head and embed_tokens often are
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("kept", torch.arange(3.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def test_full_state_dict_of_a_plain_module_is_its_state_dict():
    m = Tied()
    assert not is_partitioned(m.parameters())
    want = m.state_dict()
    got = dict(full_named_tensors(m))
    assert list(got) != [] and set(got) == set(want)  # both names of the tied weight, no scratch buffer
    for k, v in want.items():
        assert got[k] is not v and torch.equal(got[k], v)
        assert got[k].data_ptr() == v.data_ptr()  # not partitioned: the tensor itself, no copy
    cpu = full_state_dict(m)
    assert set(cpu) == set(want) and all(torch.equal(cpu[k], want[k]) for k in want)
    assert cpu["kept"].data_ptr() != m.kept.data_ptr()  # the saved copy is its own
    assert full_state_dict(m, keep=False) is None
    with gathered(m.parameters()):  # a no-op without ZeRO-3
        assert m.head.weight.shape == (5, 3)


def test_head_chunking_is_refused_where_zero3_partitions_the_head(model):
    check_head_chunking(model, 4096)  # a whole head: fine
    check_head_chunking(model, None)
    head = model.get_output_embeddings()
    head.weight.ds_id = 0  # how DeepSpeed marks a ZeRO-3 partitioned parameter
    try:
        check_head_chunking(model, None)  # not asked for: fine
        with pytest.raises(ValueError, match="head_chunk_tokens is not supported when DeepSpeed ZeRO-3"):
            check_head_chunking(model, 4096)
    finally:
        del head.weight.ds_id

