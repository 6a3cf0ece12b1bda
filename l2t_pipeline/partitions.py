"""Partitions of the L2T assets.

* ``base_models``: a dynamic partition per base model (the embedded default ``tiny-sft`` and
  whatever the model registry adds);
* ``methods``: the six training methods of l2t_core (``grpo`` ... ``l2t_random_layers``);
* ``runs``: base model × method, the partitions of ``checkpoints`` and ``benchmark_reports``.
  Its keys read ``<base_model>|<method>`` (dimensions in alphabetical order).
"""

from __future__ import annotations

import warnings

import dagster as dg

from l2t_core.config import METHOD_NAMES

DEFAULT_BASE_MODEL = "tiny-sft"

base_models_partitions = dg.DynamicPartitionsDefinition(name="base_models")
methods_partitions = dg.StaticPartitionsDefinition(list(METHOD_NAMES))
runs_partitions = dg.MultiPartitionsDefinition({"base_model": base_models_partitions, "method": methods_partitions})

# checkpoints of (base, method) read the base model's partition of single-dimension assets
with warnings.catch_warnings():  # the mapping is marked beta
    warnings.simplefilter("ignore", dg.BetaWarning)
    BASE_DIMENSION = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="base_model")


def run_key(base_model: str, method: str) -> str:
    """The ``runs`` partition key of a base model and a method."""
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    return str(dg.MultiPartitionKey({"base_model": base_model, "method": method}))


def split_run_key(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> tuple[str, str]:
    """(base_model, method) of the ``runs`` partition a step runs for."""
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["base_model"], dims["method"]
    base, sep, method = str(key).partition("|")
    if not sep:
        raise ValueError(f"expected a base_model|method partition key, got {key!r}")
    return base, method
