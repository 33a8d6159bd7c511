"""Experiments across runs: sweeps of arms × seeds and the statistics that compare them."""
