"""The shape of the library: modules in teaching order (every import points to an earlier notebook), one job per
module, and a small, plain front door."""
import ast, re, subprocess, sys

import pytest

import flair_min
from conftest import ROOT

LIB = ROOT / 'flair_min'
MODULES = sorted(p for p in LIB.glob('*.py') if p.stem not in ('__init__', '_modidx'))


def notebook_number(path) -> int:
    "The number of the notebook a module is exported from (its `File to edit: ../nbs/NN_name.ipynb` line)."
    match = re.search(r'File to edit: \.\./nbs/(\d+)_(\w+)\.ipynb', path.read_text())
    assert match, f'{path.name} does not say which notebook it is exported from'
    assert match.group(2) == path.stem, f'{path.name} is exported from a notebook named {match.group(2)!r}'
    return int(match.group(1))


def imported_modules(path) -> set[str]:
    "flair_min modules that `path` imports anywhere (top level or inside functions)."
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: names.add(node.module.split('.')[0])
            elif node.level == 1: names.update(a.name for a in node.names)
            elif node.module and node.module.startswith('flair_min.'): names.add(node.module.split('.')[1])
            elif node.module == 'flair_min': names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split('.')[1] for a in node.names if a.name.startswith('flair_min.'))
    return names


def test_notebooks_are_numbered_without_gaps():
    numbers = sorted(int(p.name[:2]) for p in (ROOT / 'nbs').glob('[0-9]*.ipynb'))
    assert numbers == list(range(len(numbers))), numbers
    assert all(re.fullmatch(r'\d\d_[a-z0-9_]+\.ipynb', p.name) for p in (ROOT / 'nbs').glob('[0-9]*.ipynb'))


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_imports_point_to_earlier_notebooks(path):
    number = {p.stem: notebook_number(p) for p in MODULES}
    for name in imported_modules(path):
        assert name in number, f'{path.stem} imports flair_min.{name}, which is not a module'
        assert number[name] < number[path.stem], (f'{path.stem} ({number[path.stem]:02d}) imports {name} '
                                                  f'({number[name]:02d}), a later notebook')


def _calls(tree, owner: str, attrs) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in attrs
               and isinstance(n.func.value, ast.Name) and n.func.value.id == owner for n in ast.walk(tree))


JOBS = {  # what a module does -> how to see it in the source
    'model': lambda t: any(isinstance(n, ast.ClassDef)
                           and n.name in ('FLAIR', 'VisionTransformer', 'TextConditionedPooling')
                           for n in ast.walk(t)),
    'checkpoint I/O': lambda t: _calls(t, 'torch', ('save', 'load')),
    'losses': lambda t: any(isinstance(n, ast.ClassDef) and n.name.endswith('Loss') for n in ast.walk(t)),
    'data reading': lambda t: any(isinstance(n, ast.ClassDef)
                                  and any(getattr(b, 'id', '') in ('IterableDataset', 'DataLoader') for b in n.bases)
                                  for n in ast.walk(t)),
    'training loop': lambda t: any(isinstance(n, ast.ClassDef) and n.name == 'Trainer' for n in ast.walk(t)),
    'command-line parsing': lambda t: any(isinstance(n, ast.Import) and any(a.name == 'argparse' for a in n.names)
                                          for n in ast.walk(t)),
}


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_one_job_per_module(path):
    tree = ast.parse(path.read_text())
    jobs = [job for job, seen in JOBS.items() if seen(tree)]
    assert len(jobs) <= 1, f'{path.stem} holds {jobs}'


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_no_module_is_over_about_450_lines(path):
    "A module is one job a reader can hold in mind: at most about 450 lines (460)."
    assert len(path.read_text().splitlines()) <= 460, f'{path.stem} has {len(path.read_text().splitlines())} lines'


def test_each_job_has_its_module():
    found = {job: [p.stem for p in MODULES if seen(ast.parse(p.read_text()))] for job, seen in JOBS.items()}
    assert found == {'model': ['model'], 'checkpoint I/O': ['checkpoint'], 'losses': ['losses'],
                     'data reading': ['data'], 'training loop': ['train'], 'command-line parsing': ['cli']}


FRONT_DOOR = ['FLAIR', 'FlairConfig', 'create_model', 'create_model_and_transforms', 'get_tokenizer', 'tokenize',
              'image_transform', 'load_checkpoint', 'download_weights_from_hf', 'list_models', 'list_pretrained',
              'FlairLoss', 'retrieval_scores', 'retrieval_metrics', 'split_caption', 'sample_subcaptions']


def test_front_door_is_exactly_all():
    assert flair_min.__all__ == FRONT_DOOR
    namespace = {}
    exec('from flair_min import *', namespace)
    assert sorted(k for k in namespace if k != '__builtins__') == sorted(FRONT_DOOR)


def test_list_models_and_pretrained():
    assert flair_min.list_models() == ['FLAIR-toy', 'ViT-B-16-FLAIR', 'tiny']
    for name in flair_min.list_models(): flair_min.FlairConfig.resolve(name)
    released = flair_min.list_pretrained()                     # open_clip's (model, tag) pairs
    assert released == [('ViT-B-16-FLAIR', tag) for tag in ('cc3m-recap', 'cc12m-recap', 'yfcc15m-recap', 'merged30m')
                        ] + [('FLAIR-toy', 'toyworld')]
    from flair_min.pretrained import get_pretrained_cfg
    assert [get_pretrained_cfg(*pair)['filename'] for pair in released[:4]] == [
        'flair-cc3m-recap.pt', 'flair-cc12m-recap.pt', 'flair-yfcc15m-recap.pt', 'flair-merged30m.pt']
    assert {get_pretrained_cfg(*pair)['repo'] for pair in released[:4]} == {'xiaorui638/flair'}
    assert get_pretrained_cfg('FLAIR-toy', 'toyworld')['path'].is_file()     # shipped inside the package


def test_the_front_door_is_plain_imports():
    "`import flair_min` leaves the import system alone: no finder on sys.meta_path, no module-level __getattr__."
    code = ("import sys; before = list(sys.meta_path); import flair_min, flair_min.train, flair_min.data; "
            "assert sys.meta_path == before, sys.meta_path; "
            "assert not any(hasattr(sys.modules[m], '__getattr__') for m in sys.modules if m.startswith('flair_min'))")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)
    assert len((LIB / '__init__.py').read_text().splitlines()) <= 25


def test_minimal_example_imports_in_a_fresh_interpreter():
    code = ("import flair_min as flair; assert callable(flair.create_model_and_transforms); "
            "assert callable(flair.get_tokenizer); assert callable(flair.download_weights_from_hf)")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)
