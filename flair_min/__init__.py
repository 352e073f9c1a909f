"""flair_min: FLAIR (CVPR 2025) rebuilt from scratch, notebook first.

Hand-written (nbdev does not own this file). The front door: the names an open_clip user reaches for, so that the
authors' minimal example runs with `import flair_min as flair`. Everything else is imported from its module
(`flair_min.losses`, `flair_min.train`, ...; the README's course path maps notebooks to modules).
"""
__version__ = "0.1.0"

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
