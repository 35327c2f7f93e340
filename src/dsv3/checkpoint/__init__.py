"""Checkpoints: run directories and manifests, one-process training state (state), exports (export)."""
