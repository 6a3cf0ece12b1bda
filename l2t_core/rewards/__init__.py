"""L2T reward math: fitting gain (§2), compression penalty (§3), baselines (§6), and the
combined per-response reward path (§4) in :mod:`l2t_core.rewards.l2t`."""
