"""Dead-latent counts carry their token window, and stand beside the paper's (~10M tokens) only when the
windows are comparable (method §A.8, Gao et al. App. A.2)."""

import math

import pandas as pd
import pytest

from saescale.evaluate.dead_window import (
    PAPER_DEAD_WINDOW_TOKENS,
    dead_window_comparable,
    paper_comparison,
    window_text,
)
from saescale.report.tables import dead_findings, dead_windows, grid_table


@pytest.mark.parametrize("tokens, comparable", [(131_072, False), (1_048_576, False), (5_000_000, True),
                                                (10_000_000, True), (20_000_000, True), (40_000_000, False),
                                                (0, False), (None, False), (math.nan, False)])
def test_only_a_window_within_2x_of_the_papers_is_comparable(tokens, comparable):
    assert dead_window_comparable(tokens) is comparable


def test_the_comparison_sentence_says_why_a_short_window_cannot_be_compared():
    assert "76x this window (131,072 tokens)" in paper_comparison(131_072)
    assert "cannot be compared" in paper_comparison(131_072)
    assert "comparable" in paper_comparison(PAPER_DEAD_WINDOW_TOKENS) and "cannot" not in \
        paper_comparison(PAPER_DEAD_WINDOW_TOKENS)
    assert "unrecorded" in paper_comparison(None) and window_text(2 ** 17) == "131,072 tokens"


def _metrics(**extra) -> pd.DataFrame:
    return pd.DataFrame({"arch": ["topk", "topk"], "n": [64, 128], "k": [4, 8], "dead_fraction": [0.1, 0.3],
                         "eval_tokens": [131_072, 131_072], "train_dead_fraction": [0.05, 0.02], **extra})


def test_findings_label_each_count_with_its_window_and_refuse_the_papers_number_when_short():
    text = " ".join(dead_findings(_metrics()))
    assert "any of the 131,072 tokens evaluated): at most 30.0% (n = 128, k = 8)" in text
    assert "at most 5.0% (n = 64, k = 4)" in text
    assert "No count here uses a comparable window" in text and "7%" in text


def test_findings_compare_with_the_paper_through_a_10m_token_training_window():
    text = " ".join(dead_findings(_metrics(train_dead_tokens=[10_000_000] * 2)))
    assert "train.dead_tokens = 10,000,000 tokens" in text
    assert "compare the train count with it" in text and "No count" not in text


def test_the_eval_window_is_the_records_own_when_it_has_one():
    m = _metrics(dead_window_tokens=[1_000_000, 1_000_000])
    assert dead_windows(m)["eval"] == 1_000_000 and math.isnan(dead_windows(m)["train"])
    assert "dead % (over 1,000,000 tokens of eval)" in grid_table(m)["columns"]
