"""Experiments: the report's sweeps and presets, run aggregation, tables, plots and the demo."""
