"""Evaluation of trained SAEs on the held-out split (method §C)."""
