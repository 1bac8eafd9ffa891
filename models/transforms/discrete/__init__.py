"""Layers that map integers to integers exactly: Integer Discrete Flows (Hoogeboom et al. 2019;
``integer_*``, ``rounding``, ``factor_out``) and the mod-K bijections of one-hot categories of
Discrete Flows (Tran et al. 2019; ``one_hot``, ``straight_through``, ``modular_affine``,
``modular_coupling``, ``categorical_base``)."""
