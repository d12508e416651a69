"""Toy experiments: SAEs on synthetic data of known geometry (Michaud et al. 2025, method §F)."""
