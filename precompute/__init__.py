"""Teachers and the cache pass: ERM + DFR (or imported checkpoints), the manifest, precompute."""
