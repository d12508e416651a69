"""saescale: a Snakemake workflow reproducing Gao et al. (2024), "Scaling and evaluating sparse autoencoders"."""

__version__ = "0.1.0"
