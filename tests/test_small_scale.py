"""The Colab recipe (nbs/18_small_scale.ipynb) on the CPU: GPU presets and how one is chosen (the step measurement
behind them is checked in the notebook, where it is defined), `train_small` on the toy shards (checkpoint,
resume='latest', the released-weights loader) and the held-out retrieval evaluation with the official metric keys."""
import argparse, json
from dataclasses import fields, replace

import pytest
import torch

from conftest import ROOT
from flair_min.small_scale import (PRESETS, GpuPreset, choose_preset, heldout_retrieval, preset_cli_args, read_pairs,
                                   resolve_preset, retrieval_hook, train_small)
from flair_min.shards import tar_samples
from flair_min.model import FLAIR, FlairConfig
from flair_min.pretrained import create_model_and_transforms
from flair_min.model import PRECISIONS
from flair_min.cli import add_train_arguments

TOY = ROOT / 'data' / 'toy'
TOY_TRAIN = str(TOY / 'toy-train-*.tar')
TINY_CLIP = replace(FlairConfig.tiny(), vocab_size=49408)   # tiny towers, CLIP vocabulary (the loader's tokenizer)
OFFICIAL_KEYS = {f'{d}_{m}' for d in ('text_to_image', 'image_to_text')
                 for m in ('R@1', 'R@5', 'R@10', 'mean_rank', 'median_rank')}


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.mark.parametrize('name', [k for k in PRESETS if k != 'cpu'])
def test_gpu_presets_are_valid(name):
    p = PRESETS[name]
    assert p.name == name and p.precision in PRECISIONS and p.precision != 'fp32'
    assert p.peak_gib is not None and p.peak_gib + 1.5 <= p.memory_gib          # measured peak, with a margin
    assert p.num_captions == 8 and p.batch_size >= 64 and p.accum_steps >= 1 and p.num_workers >= 1
    assert p.precision == ('amp' if name == 'T4' else 'amp_bf16')              # the T4 has no bfloat16
    assert {f.name for f in fields(GpuPreset)} >= {'batch_size', 'num_captions', 'precision', 'grad_checkpointing',
                                                   'accum_steps', 'num_workers'}
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(['--data', 'x'] + preset_cli_args(name))
    assert (args.batch_size, args.num_captions, args.precision, args.grad_checkpointing, args.accum_steps) == \
           (p.batch_size, p.num_captions, p.precision, p.grad_checkpointing, p.accum_steps)


def test_presets_grow_with_memory():
    cards = [PRESETS[k] for k in ('T4', 'L4', 'A100-40GB', 'A100-80GB')]
    assert [c.memory_gib for c in cards] == sorted(c.memory_gib for c in cards)
    assert [c.images_per_step for c in cards] == sorted(c.images_per_step for c in cards)


@pytest.mark.parametrize('device_name, memory, expected', [
    ('Tesla T4', 14.7, 'T4'), ('NVIDIA L4', 22.0, 'L4'), ('NVIDIA A100-SXM4-40GB', 39.4, 'A100-40GB'),
    ('NVIDIA A100-PCIE-40GB', None, 'A100-40GB'), ('NVIDIA A100-SXM4-80GB', 79.2, 'A100-80GB'),
    ('NVIDIA A100 80GB PCIe', None, 'A100-80GB'), ('NVIDIA H100 80GB HBM3', 79.1, 'A100-80GB'),
    ('NVIDIA H200', 139.8, 'A100-80GB'), ('NVIDIA GH200 480GB', 94.5, 'A100-80GB')])
def test_choose_preset_by_name_and_memory(device_name, memory, expected):
    assert choose_preset(device_name, memory).name == expected


@pytest.mark.parametrize('device_name, memory, bf16, message', [
    ('Tesla V100-SXM2-16GB', 15.8, None, "no preset for the GPU 'Tesla V100-SXM2-16GB'"),
    ('NVIDIA L40S', 44.4, True, 'no preset for the GPU'),                  # 'L4' inside another name is no L4
    ('Tesla K80', 11.2, False, "preset='T4'"),
    ('Tesla T4', 7.0, False, 'less than the 14.0 GiB'),                      # a shared or sliced card
    ('NVIDIA A100-SXM4-40GB MIG 3g.20gb', 19.5, True, 'batch_size=64'),
    ('NVIDIA L4', 22.0, False, "precision='amp'")])
def test_unknown_or_too_small_gpu_is_refused_clearly(device_name, memory, bf16, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
        choose_preset(device_name, memory, bf16)


def test_resolve_preset_and_overrides():
    assert resolve_preset('L4') is PRESETS['L4'] and resolve_preset(PRESETS['cpu']) is PRESETS['cpu']
    with pytest.raises(ValueError, match="expected 'auto'"): resolve_preset('A10G')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='Change runtime type'): resolve_preset('auto')
    with pytest.raises(TypeError, match='unknown settings'):
        train_small(TOY_TRAIN, 'unused', model=TINY_CLIP, preset='cpu', steps=1, lr_max=1)
    with pytest.raises(TypeError, match='follow the model config'):
        train_small(TOY_TRAIN, 'unused', model=TINY_CLIP, preset='cpu', steps=1, context_length=32)


def test_train_small_checkpoints_resumes_and_loads(tmp_path):
    run = dict(model=TINY_CLIP, preset='cpu', steps=4, lr=1e-3, progress=False)
    _, straight, _ = train_small(TOY_TRAIN, tmp_path / 'straight', **run)
    _, first, path = train_small(TOY_TRAIN, tmp_path / 'cut', until=3, **run)       # a session cut short after 3 steps
    assert path == tmp_path / 'cut' / 'checkpoints' / 'latest.pt' and len(first['loss']) == 3
    assert torch.load(path, weights_only=True)['step'] == 3
    # the same call again: resume='latest'
    model, resumed, path = train_small(TOY_TRAIN, tmp_path / 'cut', **run)
    assert resumed['loss'][:3] == first['loss'] and len(resumed['loss']) == 4
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-5)             # crossing into epoch 1 included
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint['step'], checkpoint['preset']['name'], checkpoint['preset']['batch_size']) == (4, 'cpu', 8)
    assert json.loads((tmp_path / 'cut' / 'history.json').read_text())['loss'] == resumed['loss']
    loaded, _, _ = create_model_and_transforms(TINY_CLIP, pretrained=path)          # the released-weights loader
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_train_small_overrides_and_errors(tmp_path):
    _, history, _ = train_small(TOY_TRAIN, tmp_path, model=TINY_CLIP, preset='cpu', steps=1, batch_size=4,
                                num_captions=2, max_merged=1, warmup=1, progress=False)
    ckpt = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert (ckpt['preset']['batch_size'], ckpt['preset']['num_captions'], ckpt['train_config']['warmup']) == (4, 2, 1)
    with pytest.raises(TypeError, match='unknown settings'):
        train_small(TOY_TRAIN, tmp_path, model=TINY_CLIP, preset='cpu', steps=1, batch=4)
    with pytest.raises(ValueError, match='vocabulary has 1000'):                     # CLIP token ids, 1,000-token model
        train_small(TOY_TRAIN, tmp_path / 'tiny', model='tiny', preset='cpu', steps=1, progress=False)


def test_evaluation_returns_the_official_metric_keys():
    images, captions = read_pairs(TOY / 'toy-eval.npz', image_size=32)
    torch.manual_seed(0)
    model = FLAIR(TINY_CLIP)
    metrics = heldout_retrieval(model, images, captions, modes=('flair', 'global', 'topk'))
    assert set(metrics) == {'flair', 'global', 'topk'}
    for m in metrics.values():
        assert set(m) == OFFICIAL_KEYS
        assert all(0 <= m[f'{d}_R@{k}'] <= 1 for d in ('text_to_image', 'image_to_text') for k in (1, 5, 10))
        assert 1 <= m['text_to_image_mean_rank'] <= len(images)
    assert metrics['topk'] == metrics['flair']                # 16 texts, top-128: every text is rescored the FLAIR way
    flat = retrieval_hook(images, captions, keys=None)(model)
    assert set(flat) == {f'{mode}/{k}' for mode in ('flair', 'global') for k in OFFICIAL_KEYS}
    assert model.training                                     # evaluation leaves the training mode as it found it


def test_held_out_pairs_from_a_shard_training_does_not_read():
    images, captions = read_pairs(TOY / 'toy-dreamlip-000000.tar', n=100, image_size=64)
    assert images.shape == (8, 3, 64, 64) and len(captions) == 8                    # all 8 samples of the shard
    first = json.loads(next(tar_samples(str(TOY / 'toy-dreamlip-000000.tar')))['json'])
    assert captions[0] == ' '.join(first['longIB_captions'])                         # the long DreamLIP field, joined
    images, captions = read_pairs(TOY / 'bad-samples.tar', n=100, image_size=32)     # bad samples skipped, not fatal
    assert len(captions) == 6
    with pytest.raises(ValueError, match='no usable'):
        read_pairs(TOY / 'bad-samples.tar', caption_fields=('longSV_captions',))
