"""Rerun hashes: a stage's CLI source is its command and the helpers its code uses, nothing more."""

import pytest

from saescale.provenance import cli_source, code_version

CLI = '''
def helper():
    return 1


def digest(path):
    return f"{path}@main"  # a word that names another function, in a string


def cmd_a(args):
    """Calls helper, not cmd_b."""
    return helper() + len(digest(args))


def cmd_b(args):
    return 2


def main():
    return {"a": cmd_a, "b": cmd_b}
'''


def test_a_command_pulls_the_helpers_it_calls_and_not_names_in_strings():
    src = cli_source("a", CLI)
    assert "def helper" in src and "def digest" in src
    assert "def main" not in src and "def cmd_b" not in src


def test_editing_another_command_leaves_a_commands_source_unchanged():
    assert cli_source("a", CLI) == cli_source("a", CLI.replace("return 2", "return 3"))
    assert cli_source("a", CLI) != cli_source("a", CLI.replace("return 1", "return 0"))


def test_unknown_stage_is_an_error_and_real_stages_hash():
    with pytest.raises(ValueError, match="cmd_nope"):
        cli_source("nope", CLI)
    assert code_version("extract", "store.py") != code_version("train", "store.py")
    assert "def cmd_probes" not in cli_source("extract")
