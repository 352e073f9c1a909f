import sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'data' / 'reference'   # copies of ../shared/reference, committed with the project

@pytest.fixture(scope='session')
def text_vectors():
    return torch.load(REFERENCE / 'text_vectors.pt', weights_only=True)

@pytest.fixture(scope='session')
def flair_tiny():
    return torch.load(REFERENCE / 'flair_tiny.pt', weights_only=True)
