"""Explaining SAE latents: activating-example records, N2G explanations and LLM autointerp."""
