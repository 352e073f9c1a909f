"""The main job, `flair-min demo` (nbs/09_toy_experiment): an end-to-end run of a small configuration through the
command-line arguments, and property tests of its evaluation pieces against naive versions."""
import argparse, json

import numpy as np
import pytest
import torch

from flair_min.experiment import (DemoConfig, add_demo_arguments, demo_config, demo_model_config, fine_grained_metrics,
                                  fine_grained_texts, localization_maps, run_demo, tokenize_texts, trim_padding)
from flair_min.model import FLAIR
from flair_min.toyworld import make_eval_split

SMALL = ['--quick', '--steps', '8', '--train-scenes', '64', '--eval-scenes', '24', '--batch-size', '8', '--threads', '1', '--quiet']


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args([*SMALL, '--out', str(out)])
    return out, run_demo(args)


def test_outputs_exist(small_run):
    out, results = small_run
    for name in ('metrics.json', 'table.txt', 'losses.png', 'metrics.png', 'heatmaps.png', 'data/toy-eval.npz', 'data/manifest.json'):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / 'data').glob('toy-train-*.tar')) == ['toy-train-000000.tar']
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['margins'] == pytest.approx(results['margins'])
    table = (out / 'table.txt').read_text()
    for label in ('fine-grained T→I R@1', 'long caption I→T R@5', 'localization pointing game', 'FLAIR', 'baseline', 'margin'):
        assert label in table


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
    run_demo(demo_config(add_demo_arguments(argparse.ArgumentParser()).parse_args([*SMALL, '--out', str(out), '--steps', '1', '--no-plots'])))
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'data').iterdir()} == before


def test_arguments():
    parser = add_demo_arguments(argparse.ArgumentParser())
    assert demo_config(parser.parse_args([])) == DemoConfig()
    quick = demo_config(parser.parse_args(['--quick', '--seed', '3']))
    assert quick == DemoConfig.quick(seed=3)
    with pytest.raises(ValueError, match='batch_size=64 is larger than train_scenes=32'):
        demo_config(parser.parse_args(['--batch-size', '64', '--train-scenes', '32']))
    with pytest.raises(ValueError, match='steps=0'):
        demo_config(parser.parse_args(['--steps', '0']))


def test_trim_padding_is_exact():
    torch.manual_seed(0)
    model = FLAIR(demo_model_config(DemoConfig(vision_layers=1, text_layers=2))).eval()
    ids = tokenize_texts(['A small red star in the bottom left', 'There are five objects. The background is plain gray'])
    full = torch.cat([ids, torch.zeros(len(ids), 77 - ids.shape[1], dtype=ids.dtype)], 1)  # (2, 77)
    assert trim_padding(full).shape == ids.shape
    with torch.no_grad(): torch.testing.assert_close(model.embed_text(ids), model.embed_text(full), rtol=1e-5, atol=1e-5)


def naive_fine_grained(scores, txt2img):
    "Loop version: t→i rank of each text's image among all images; i→t best rank of an image's texts, images with texts only."
    t2i = [int((scores[:, t] > scores[txt2img[t], t]).sum() + ((scores[:, t] == scores[txt2img[t], t]) & (torch.arange(len(scores)) < txt2img[t])).sum())
           for t in range(scores.shape[1])]
    i2t = []
    for i in range(scores.shape[0]):
        own = [t for t in range(scores.shape[1]) if txt2img[t] == i]
        if not own: continue
        ranks = [int((scores[i] > scores[i, t]).sum() + ((scores[i] == scores[i, t]) & (torch.arange(scores.shape[1]) < t)).sum()) for t in own]
        i2t.append(min(ranks))
    return np.array(t2i), np.array(i2t)


@pytest.mark.parametrize('seed', range(5))
def test_fine_grained_metrics_against_loops(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (12, 30), generator=g).float()       # many ties on purpose
    txt2img = torch.randint(0, 9, (30,), generator=g)                  # images 9..11 (and maybe others) have no text
    t2i, i2t = naive_fine_grained(scores, txt2img)
    m = fine_grained_metrics(scores, txt2img)
    for k in (1, 5, 10):
        assert m[f'text_to_image_R@{k}'] == pytest.approx((t2i < k).mean())
        assert m[f'image_to_text_R@{k}'] == pytest.approx((i2t < k).mean())
    assert m['text_to_image_mean_rank'] == pytest.approx(t2i.mean() + 1)
    assert m['image_to_text_median_rank'] == np.floor(np.median(i2t)) + 1


def test_fine_grained_texts_are_unique():
    split = make_eval_split(40, seed=10_000)
    texts, txt2img = fine_grained_texts(split)
    assert len(texts) == len(set(texts.tolist())) > 0
    sentences = split['sentences'].tolist()
    for text, image in zip(texts.tolist(), txt2img.tolist()):
        holders = {int(split['sentence_image'][i]) for i, s in enumerate(sentences) if s == text}
        assert holders == {image}
    assert all(t.startswith('A ') for t in texts.tolist())                  # object sentences only


def test_localization_maps():
    torch.manual_seed(0)
    model = FLAIR(demo_model_config(DemoConfig(vision_layers=1, text_layers=1))).eval()
    images, ids, txt2img = torch.randn(3, 3, 64, 64), tokenize_texts(['A small red star in the center'] * 2 + ['There is one object']), torch.tensor([2, 0, 1])
    attention = localization_maps(model, images, ids, txt2img, 'attention')
    similarity = localization_maps(model, images, ids, txt2img, 'similarity')
    assert attention.shape == similarity.shape == (3, 8, 8)
    with torch.no_grad():                                                  # each map is the one of its own image
        _, weights = model.pool(model.embed_text(ids[:1]), model.embed_image(images[2:3])[1], return_attention=True)
    torch.testing.assert_close(attention[0].flatten(), weights[0, 0, :-1], rtol=1e-5, atol=1e-6)
    assert similarity.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="expected 'attention' or 'similarity'"):
        localization_maps(model, images, ids, txt2img, 'saliency')
