"""Experiment configs (one file per run; see README.md) and the CPU toy alpha study."""
