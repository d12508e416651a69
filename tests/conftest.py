import pytest
import torch

# The suite runs on 2 pytest-xdist workers, one file per worker at a time (pyproject addopts). Starting the
# longest files first lets the short ones fill in around them instead of one long file running alone at the
# end: the quick-preset workflow (~5 min) and the SLURM cluster run (~3 min, mostly waiting on sbatch).
LONGEST_FIRST = ("test_workflow.py", "test_slurm.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        return (1, 0) if item.get_closest_marker("slow") else (2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
