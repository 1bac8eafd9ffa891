"""Variational auto-encoders whose approximate posterior is a normalizing flow (no data loading here)."""
from models.vae.flow_vae import FLOWS, FlowVAE

__all__ = ["FLOWS", "FlowVAE"]
