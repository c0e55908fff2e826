"""Experiments: the study's sweeps and presets, run aggregation, tables, plots and the demo."""
