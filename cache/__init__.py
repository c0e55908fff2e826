"""The teacher cache: the contract between precompute (writes it) and distill (reads it)."""
