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

@pytest.fixture
def one_thread():
    "One torch thread for the test: the tiny models are fastest so when the machine's two cores are shared."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
