"""Variational auto-encoders whose approximate posterior is a normalizing flow."""
from models.vae.flow_vae import FlowVAE, binarize, load_binarized_fashion_mnist

__all__ = ["FlowVAE", "binarize", "load_binarized_fashion_mnist"]
