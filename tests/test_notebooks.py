"""Every notebook is a test: run each one top to bottom, as `nbdev_test` does, skipping the cells
flagged with a `tst_flags` flag (`#| gpu`, `#| slow`). Scratch notebooks (`_*.ipynb`) are skipped.

Settings for this machine live here, not in a cell a reader runs: the notebooks run in this process with one
torch thread (their tensors are tiny, and the tests share two cores), and with FLAIR_MIN_QUICK=1, which a notebook
that trains reads to train on a smaller budget (flair_in_one_notebook)."""
import pytest
from nbdev import test as nbdev_testing
from nbdev.config import get_config

from conftest import ROOT

NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(notebook, monkeypatch, one_thread):
    monkeypatch.chdir(ROOT)
    skip_flags = get_config().tst_flags.split()
    assert {'gpu', 'slow'} <= set(skip_flags)
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    monkeypatch.setenv('FLAIR_MIN_QUICK', '1')
    passed, _ = nbdev_testing.test_nb(notebook, skip_flags=skip_flags, basepath=ROOT)
    assert passed, f'{notebook.name} failed; the traceback is printed above'
