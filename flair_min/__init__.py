"""flair_min: FLAIR (CVPR 2025) rebuilt from scratch, notebook first.

Hand-written (nbdev does not own this file). The front door: the names an open_clip user reaches
for, so that the authors' minimal example runs with `import flair_min as flair`. Everything else
is imported from its module (`flair_min.losses`, `flair_min.train`, ...; the README maps them).
"""
__version__ = "0.1.0"

import importlib.abc, importlib.machinery, sys

from .tokenizer import get_tokenizer, tokenize
from .captions import sample_subcaptions, split_caption
from .model import FLAIR, FlairConfig, image_transform, list_models
from .checkpoint import download_weights_from_hf, load_checkpoint
from .losses import FlairLoss
from .retrieval import retrieval_metrics, retrieval_scores
from .pretrained import create_model, create_model_and_transforms, list_pretrained

__all__ = ['FLAIR', 'FlairConfig', 'create_model', 'create_model_and_transforms', 'get_tokenizer', 'tokenize',
           'image_transform', 'load_checkpoint', 'download_weights_from_hf', 'list_models', 'list_pretrained',
           'FlairLoss', 'retrieval_scores', 'retrieval_metrics', 'split_caption', 'sample_subcaptions']

# Where the names of flair_min 0.1 went when the modules were re-cut into teaching order. An old
# module name fails with an error naming its new place; an old `module.name` that moved to another
# module fails the same way (`from flair_min.model import load_state_dict_strict` included).
MOVED_MODULES = {'flair_min.experiment': 'flair_min.demo', 'flair_min.colab': 'flair_min.small_scale',
                 'flair_min.benchmarks': 'flair_min.eval_sets'}
MOVED_NAMES = {
    'flair_min.model': {n: 'flair_min.checkpoint' for n in ('unwrap_state_dict', 'config_from_state_dict',
                        'StateDictMismatchError', 'state_dict_mismatches', 'load_state_dict_strict')},
    'flair_min.pretrained': {'read_checkpoint': 'flair_min.checkpoint', 'resolve_config': 'flair_min.model.FlairConfig.resolve'},
    'flair_min.train': {'MultiPositiveLoss': 'flair_min.losses', 'PRECISIONS': 'flair_min.model',
                        'model_config': 'flair_min.model.FlairConfig.resolve',
                        **{n: 'flair_min.cli' for n in ('add_train_arguments', 'run_train', 'build_model', 'build_loader',
                                                        'toy_shards', 'total_steps', 'train_config_from_args')}},
    'flair_min.data': {n: 'flair_min.cc3m' for n in ('cc3m_wds_urls', 'download', 'shard_image_urls', 'read_dreamlip_captions',
                       'recap_record', 'write_recap_shard', 'prepare_cc3m_recap', 'CC3M_WDS_REPO', 'CC3M_WDS_SHARDS',
                       'CC3M_WDS_SAMPLES', 'DREAMLIP_CC3M_CSV', 'DREAMLIP_URL_COLUMN', 'HUB_SOURCES')},
    'flair_min.toyworld': {**{n: "tests/fixtures.py (test fixtures are not part of the library)"
                              for n in ('bad_shard_members', 'write_fixtures', 'BAD_KINDS', 'BAD_SHARD_KINDS')},
                           'pointing_game': 'flair_min.localization'},
}

def _moved_error(module: str, name: str, new: str) -> ImportError:
    is_module = new.startswith('flair_min.') and new.count('.') == 1
    where = f'{new}.{name}' if is_module else new   # a module: the same name there; else the replacement itself
    return ImportError(f"{module}.{name} has moved: use {where} (flair_min's modules follow the notebooks' "
                       f"teaching order; see the README's notebook map)", name=module)

def _install_moved_names(module) -> None:
    moved = MOVED_NAMES.get(module.__name__, {})
    def __getattr__(name):
        if name in moved: raise _moved_error(module.__name__, name, moved[name])
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
    module.__getattr__ = __getattr__

class _MovedFinder(importlib.abc.MetaPathFinder):
    "Old module names fail with the new name; modules that lost names get a __getattr__ that says where they went."
    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED_MODULES:
            raise ModuleNotFoundError(f"{fullname} is now {MOVED_MODULES[fullname]} (flair_min's modules follow the "
                                      f"notebooks' teaching order; see the README's notebook map)", name=fullname)
        if fullname not in MOVED_NAMES: return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None: spec.loader = _MovedNamesLoader(spec.loader)
        return spec

class _MovedNamesLoader(importlib.abc.Loader):
    def __init__(self, loader): self.loader = loader
    def create_module(self, spec): return self.loader.create_module(spec)
    def exec_module(self, module):
        self.loader.exec_module(module)
        _install_moved_names(module)

sys.meta_path.insert(0, _MovedFinder())
for _name in MOVED_NAMES:   # modules the front door has already imported
    if _name in sys.modules: _install_moved_names(sys.modules[_name])
