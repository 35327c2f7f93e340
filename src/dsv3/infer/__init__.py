"""Inference: latent-KV-cache generation."""
