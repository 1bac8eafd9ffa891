"""Continuous normalizing flows (FFJORD, RNODE): the CNF transform, its augmented dynamics,
trace estimators and the RNODE regularisers."""
