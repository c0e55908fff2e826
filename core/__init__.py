"""The shared bottom layer: errors, files, provenance, tables, runtime, models and the weighting maths."""
