"""Data sets: metadata and groups, the synthetic generator, views, the image store and the metrics."""
