"""Checkpoints: Hugging Face safetensors I/O (hf) and full training state (state)."""
