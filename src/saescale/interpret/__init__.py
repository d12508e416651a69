"""Explaining SAE latents: activating-example records, LLM autointerp, and a local chat server."""
