"""Evaluation suite (METHOD.md §7).

Modules of this package:

* :mod:`l2t_core.eval.datasets`: the benchmark registry and validated loaders (local JSONL files in
  ``L2T_DATA_DIR``, with a Hugging Face hub fallback cached as JSONL).
* :mod:`l2t_core.eval.synthetic`: the synthetic tasks' held-out splits (``walk_heldout``,
  ``arithmetic_heldout``) as benchmarks of ``l2t eval``, with the task's own prompt.
* :mod:`l2t_core.eval.metrics`: pass@k (unbiased), maj@k and efficiency.
* :mod:`l2t_core.eval.runner`: sample n responses per math problem through a rollout engine, verify
  (process pool), pass@1 / maj@k / tokens overall and per level or tier.
* :mod:`l2t_core.eval.analyses`: budget curves (Fig. 3) and depth curves (Fig. 1) by forced answers.
* :mod:`l2t_core.eval.episode_view`: HTML view of a response coloured by per-episode reward.
* :mod:`l2t_core.eval.best_of_n`: best-of-N with the L2T score vs log-likelihood and majority vote.
* :mod:`l2t_core.eval.report`: JSON, markdown and HTML reports with plots, and the sample table.
* :mod:`l2t_core.eval.sandbox`: isolated execution of generated Python programs (HumanEval).
* :mod:`l2t_core.eval.code`: HumanEval through a rollout engine: prompt, completion extraction,
  sandboxed execution of every sample, pass@1 / pass@k (unbiased) overall and per problem.
* :mod:`l2t_core.eval.compare`: Fig. 2-style comparison of several models' reports (accuracy,
  tokens, token ratio and efficiency against a base model).
"""
