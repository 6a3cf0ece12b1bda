"""L2T core."""
