"""Invertible residual blocks (i-ResNet, Residual Flows) and their log-det estimators."""
