"""flair_min: FLAIR (CVPR 2025) rebuilt from scratch, notebook first.

Hand-written (nbdev does not own this file): it re-exports the public names, so that
`from flair_min import get_tokenizer` works and the official minimal example runs with
`import flair_min as flair`.
"""
__version__ = "0.1.0"

from .tokenizer import SimpleTokenizer, get_tokenizer

from .captions import (split_caption, caption_pool, sample_subcaptions, sample_subcaption_indices,
                       tokenize_pool, TokenizedPool, sample_subcaption_tokens, DREAMLIP_FIELDS)
from .model import (FLAIR, FlairConfig, image_transform, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
                    load_state_dict_strict, StateDictMismatchError, unwrap_state_dict)
from .losses import FlairLoss, flair_loss
# (the `train` function stays in `flair_min.train`: re-exporting it here would shadow the module of that name)
from .train import Trainer, TrainConfig, MultiPositiveLoss, make_loss, plot_history, save_checkpoint, init_distributed
from .pretrained import (create_model_and_transforms, create_model, download_weights_from_hf, load_checkpoint,
                         read_checkpoint, PRETRAINED_FILES)
from .data import DataConfig, make_train_loader, seeded
from .toyworld import ToyWorldConfig, make_scene, write_shards, make_eval_split, load_eval_split
from .retrieval import retrieval_scores, retrieval_metrics
from .benchmarks import read_benchmark
from .colab import (GpuPreset, PRESETS, choose_preset, measure_train_step, measure_grid, measurement_table,
                    scale_throughput, train_small, read_pairs, evaluate_retrieval, retrieval_hook)
