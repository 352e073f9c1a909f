"""CI's own pieces: the GitHub workflow runs .ci/run on push and pull request, and the user-install check
(.ci/user_install.py) finds the README's install command and every import of the library and the notebooks."""
import configparser, importlib.util, re

import yaml

from conftest import ROOT

spec = importlib.util.spec_from_file_location('user_install', ROOT / '.ci' / 'user_install.py')
user_install = importlib.util.module_from_spec(spec); spec.loader.exec_module(user_install)


def test_workflow_runs_ci_on_push_and_pull_request():
    workflow = yaml.safe_load((ROOT / '.github' / 'workflows' / 'ci.yml').read_text())
    triggers = workflow.get('on', workflow.get(True))     # YAML 1.1 reads a bare `on` key as True
    assert {'push', 'pull_request'} <= set(triggers)
    (job,) = workflow['jobs'].values()
    assert any(step.get('run') == 'bash .ci/run' for step in job['steps'])
    versions = job['strategy']['matrix']['python-version']
    settings = configparser.ConfigParser(); settings.read(ROOT / 'settings.ini')
    assert versions[0] == settings['DEFAULT']['min_python'] and versions == ['3.10', '3.11', '3.12']
    classic = re.search(r"py_versions = '([\d. ]+)'\.split\(\)", (ROOT / 'setup.py').read_text()).group(1).split()
    assert set(versions) <= set(classic)   # setup.py's classifier list holds every Python the workflow tests


def test_install_command_is_the_readmes():
    assert user_install.install_command() == 'pip install -e .'
    assert 'pip install -e . && flair-min demo' in (ROOT / 'README.md').read_text()


def test_notebook_code_with_magics_parses():
    code = user_install.code_of("import sys\nif 'google.colab' in sys.modules:\n    %pip install -q x\n!ls\nimport a.b")
    assert code.splitlines()[2] == '    pass' and code.splitlines()[3] == 'pass'
    assert user_install.imported_modules(code, 'cell') == {'sys': 'cell', 'a': 'cell'}
    inner = "def f():\n    from PIL import Image\n    import torch.nn as nn\n"
    assert set(user_install.imported_modules(inner, 'f')) == {'PIL', 'torch'}


def test_import_check_names_a_missing_module(monkeypatch):
    found = user_install.project_imports()
    assert {'torch', 'fastcore', 'nbdev', 'ipywidgets'} <= set(found)
    assert 'scipy' not in found   # the tests' statistics stay out of the notebooks a user runs
    monkeypatch.setattr(user_install, 'project_imports', lambda: {**found, 'not_a_package_xyz': 'nbs/x.ipynb cell 3'})
    (missing,) = user_install.check_imports()
    assert missing.startswith('not_a_package_xyz (imported in nbs/x.ipynb cell 3)') and 'settings.ini' in missing
    assert 'google' in user_install.HOST_MODULES and 'IPython' in user_install.HOST_MODULES
