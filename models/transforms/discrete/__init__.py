"""Layers that map integers to integers exactly (Integer Discrete Flows, Hoogeboom et al. 2019)."""
