"""The main job, `flair-min demo` (nbs/17_demo): an end-to-end run of a small configuration through the
command-line arguments, its settings, and its training batches (the evaluation pieces: tests/test_toy_eval.py)."""
import argparse, json

import numpy as np
import pytest
import torch

from flair_min.demo import (DemoConfig, demo_config, make_demo_loader, prepare_toy_data, run_demo,
                            train_demo_model)
from flair_min.model import FLAIR
from flair_min.toy_eval import eval_images
from flair_min.cli import add_demo_arguments
from flair_min.toyworld import load_eval_split

SMALL = ['--quick', '--steps', '8', '--train-scenes', '64', '--eval-scenes', '24', '--batch-size', '8',
         '--threads', '1', '--quiet']


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args([*SMALL, '--out', str(out)])
    return out, run_demo(vars(args))


def test_outputs_exist(small_run):
    out, results = small_run
    for name in ('metrics.json', 'table.txt', 'losses.png', 'metrics.png', 'heatmaps.png', 'data/toy-eval.npz',
                 'data/manifest.json'):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / 'data').glob('toy-train-*.tar')) == ['toy-train-000000.tar']
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['margins'] == pytest.approx(results['margins'])
    table = (out / 'table.txt').read_text()
    for label in ('fine-grained T→I R@1', 'long caption I→T R@5', "pointing game, the model's map",
                  'segmentation mIoU, colours (best)', 'best of the three maps, chosen on this split',
                  'FLAIR', 'baseline', 'margin', 'chance'):
        assert label in table
    assert table.index('localization') < table.index('Retrieval') < table.index('Diagnostics')   # localization first
    assert all(0 <= v <= 1 for m in ('flair', 'baseline') for v in results[m]['segmentation'].values())


def test_metrics_in_range(small_run):
    _, results = small_run
    for model in ('flair', 'baseline'):
        for section in ('fine_grained', 'long_caption'):
            recalls = {k: v for k, v in results[model][section].items() if 'R@' in k}
            assert len(recalls) == 6 and all(0 <= v <= 1 for v in recalls.values()), (model, section, recalls)
        assert all(0 <= v <= 1 for v in results[model]['localization'].values())
    for key, margin in results['margins'].items(): assert -1 <= margin <= 1, key
    assert results['config']['steps'] == 8 and results['config']['train_scenes'] == 64
    assert set(results['timings']) >= {'data_s', 'train_flair_s', 'train_baseline_s', 'eval_s', 'total_s'}
    assert all(np.isfinite(v) for v in results['final_loss'].values())


def test_rerun_reuses_data(small_run, tmp_path):
    out, _ = small_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / 'data').iterdir()}
    run_demo(demo_config(vars(add_demo_arguments(argparse.ArgumentParser())
                              .parse_args([*SMALL, '--out', str(out), '--steps', '1', '--no-plots']))))
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'data').iterdir()} == before


def test_arguments():
    parser = add_demo_arguments(argparse.ArgumentParser())
    assert demo_config(vars(parser.parse_args([]))) == DemoConfig()
    quick = demo_config(vars(parser.parse_args(['--quick', '--seed', '3'])))
    assert quick == DemoConfig.quick(seed=3)
    with pytest.raises(ValueError, match='batch_size=64 is larger than train_scenes=32'):
        demo_config(vars(parser.parse_args(['--batch-size', '64', '--train-scenes', '32'])))
    with pytest.raises(ValueError, match='steps=0'):
        demo_config({'steps': 0})
    with pytest.raises(SystemExit):                                  # the command line refuses it when parsing
        parser.parse_args(['--steps', '0'])
    assert demo_config(vars(parser.parse_args(['--long', '--seed', '2']))) == DemoConfig.long(seed=2)
    long = DemoConfig.long()
    assert (long.image_size, long.patch_size, long.steps, long.warmup, long.batch_size) == (48, 16, 3200, 200, 32)
    with pytest.raises(ValueError, match='at most one of them'):
        demo_config(vars(parser.parse_args(['--quick', '--long'])))
    cell = demo_config(vars(parser.parse_args(['--image-size', '48', '--patch-size', '16'])))
    assert (cell.image_size, cell.patch_size) == (48, 16)
    with pytest.raises(ValueError, match='image_size=48 is not a multiple of patch_size=10'):
        demo_config(vars(parser.parse_args(['--image-size', '48', '--patch-size', '10'])))


def test_demo_config_checks_its_fields():
    "DemoConfig refuses bad settings when it is made, one error naming every bad field."
    with pytest.raises(ValueError, match=r"steps=0: expected an int >= 1; batch_size=2.5: expected an int >= 1"):
        DemoConfig(steps=0, batch_size=2.5)
    with pytest.raises(ValueError, match='image_size=48 is not a multiple of patch_size=10'):
        DemoConfig(image_size=48, patch_size=10)
    with pytest.raises(ValueError, match='train_scenes=512'):
        DemoConfig.quick(batch_size=600)


class LoaderTrim:
    "The trim the demo's loader used to do: each text block cut after its last column that is not padding (0)."
    def __init__(self, loader): self.loader = loader
    def __iter__(self):
        for images, texts, *rest in self.loader:
            yield (images, texts[..., :max(int((texts != 0).sum(-1).max()), 1)], *rest)


def test_training_is_the_same_without_the_loader_side_trim(tmp_path, one_thread):
    "The text tower trims each batch to its last end-of-text itself: cutting the padding in the loader changes no loss."
    config = DemoConfig.quick(out=str(tmp_path), train_scenes=32, eval_scenes=4, batch_size=8, steps=4, warmup=1,
                              vision_layers=1, text_layers=1, progress=False)
    shards, _ = prepare_toy_data(config)
    _, texts, *_ = next(iter(make_demo_loader(shards, config)))
    assert texts.shape[1:] == (config.num_captions, 77)                       # the loader keeps the full context
    _, full = train_demo_model('flair', make_demo_loader(shards, config), config)
    _, cut = train_demo_model('flair', LoaderTrim(make_demo_loader(shards, config)), config)
    assert len(full['loss']) == len(cut['loss']) == 4
    np.testing.assert_allclose(full['loss'], cut['loss'], rtol=0, atol=1e-5)


def test_image_and_patch_size_reach_world_model_and_loader(tmp_path):
    "A run at 48 pixels in 16-pixel patches: the shards, the evaluation images and the model all use that size."
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        [*SMALL, '--steps', '2', '--image-size', '48', '--patch-size', '16', '--no-plots', '--out', str(tmp_path)])
    results = run_demo(vars(args))
    split = load_eval_split(tmp_path / 'data' / 'toy-eval.npz')
    assert split['images'].shape[1:] == (48, 48, 3) and eval_images(split).shape[1:] == (3, 48, 48)
    model = FLAIR.from_state_dict(torch.load(tmp_path / 'flair.pt'))
    assert (model.config.image_size, model.config.patch_size, model.config.grid_size) == (48, 16, 3)
    images, _ = next(iter(make_demo_loader(str(tmp_path / 'data' / 'toy-train-*.tar'), demo_config(vars(args)))))
    assert images.shape[1:] == (3, 48, 48)
    assert 0 <= results['flair']['localization']['pointing_game'] <= 1


def test_diagnostics_in_results_and_table(small_run):
    out, results = small_run
    attributes = {'shape', 'colour', 'size', 'position'}
    for model in ('flair', 'baseline', 'untrained'):
        for section in ('image_probe', 'text_swap_cosine'):
            assert set(results[model][section]) == attributes, (model, section)
    for model in ('flair', 'baseline'):
        assert set(results[model]['attributes']) == attributes
        assert all(0 <= v <= 1
                   for v in [*results[model]['attributes'].values(), *results[model]['image_probe'].values()])
    table = (out / 'table.txt').read_text()
    for label in ('attribute swap shape', 'image probe position', 'text swap cosine colour', 'untrained towers'):
        assert label in table


def test_ablation_results_path_is_made_before_any_training(tmp_path, monkeypatch):
    "A results path that cannot be a folder fails at once, not after the ten trainings of the ablation."
    import flair_min.demo
    def refuse(*args, **kwargs): raise AssertionError('trained before the results folder was made')
    monkeypatch.setattr(flair_min.demo, 'train_demo_model', refuse)
    (tmp_path / 'taken').write_text('a file')
    with pytest.raises(FileExistsError, match='taken'):
        flair_min.demo.run_ablation(dict(quick=True, quiet=True, out=str(tmp_path / 'demo')),
                                    results_dir=tmp_path / 'taken')
