"""The token window a dead-latent count is taken over, and whether it may stand beside the paper's.

Torch-free, so the report can label its dead-latent numbers without importing the evaluation stack.
"""

from __future__ import annotations

import math

# Gao et al. App. A.2: latents are flagged dead when "they have not activated for some predetermined number of
# tokens (typically 10 million)" (method §A.8). A shorter window counts more rare-but-alive latents as dead.
PAPER_DEAD_WINDOW_TOKENS = 10_000_000
COMPARABLE_WINDOW = 2.0  # our choice: windows within 2x of each other count roughly the same latents dead


def dead_window_comparable(window_tokens: float | None, paper_tokens: float = PAPER_DEAD_WINDOW_TOKENS,
                           factor: float = COMPARABLE_WINDOW) -> bool:
    """Whether a dead-latent count over `window_tokens` may be set beside the paper's: the windows are within
    `factor` of each other. A latent firing at rate p looks dead over T tokens with probability (1 - p)^T, so
    the count depends on T itself, not only on the SAE."""
    if window_tokens is None or not math.isfinite(window_tokens) or window_tokens <= 0:
        return False
    return paper_tokens / factor <= window_tokens <= paper_tokens * factor


def window_text(window_tokens: float | None) -> str:
    """'131,072 tokens', or 'an unrecorded number of tokens' when the window is unknown."""
    if window_tokens is None or not math.isfinite(window_tokens) or window_tokens <= 0:
        return "an unrecorded number of tokens"
    return f"{int(window_tokens):,} tokens"


def paper_comparison(window_tokens: float | None, paper_tokens: float = PAPER_DEAD_WINDOW_TOKENS) -> str:
    """The sentence that goes beside any comparison with the paper's dead-latent numbers: either the windows
    are comparable, or this one is shorter / longer by a stated factor and the numbers cannot be compared."""
    paper = f"the paper counts over ~{paper_tokens / 1e6:g}M tokens"
    if dead_window_comparable(window_tokens, paper_tokens):
        return f"this window ({window_text(window_tokens)}) is comparable: {paper}"
    if window_tokens is None or not math.isfinite(window_tokens) or window_tokens <= 0:
        return f"{paper}; this window is unrecorded, so the numbers cannot be compared"
    ratio = paper_tokens / window_tokens
    if ratio > 1:
        return (f"{paper}, {ratio:,.0f}x this window ({window_text(window_tokens)}), so they cannot be compared: a "
                "shorter window counts rarely firing latents as dead")
    return (f"{paper}, 1/{1 / ratio:,.0f} of this window ({window_text(window_tokens)}), so they cannot be "
            "compared: a longer window counts fewer latents as dead")
