"""The main job, `flair-min demo` (nbs/15_demo): an end-to-end run of a small configuration through the
command-line arguments, and property tests of its evaluation pieces against naive versions."""
import argparse, json

import numpy as np
import pytest
import torch

from flair_min.demo import (DemoConfig, demo_config, demo_model_config, eval_images, fine_grained_metrics,
                            fine_grained_texts, own_image_maps, make_demo_loader, run_demo, tokenize_texts,
                            trim_padding)
from flair_min.model import FLAIR
from flair_min.cli import add_demo_arguments
from flair_min.toyworld import load_eval_split, make_eval_split

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
                  'segmentation mIoU, colours', 'FLAIR', 'baseline', 'margin', 'chance'):
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


def test_trim_padding_is_exact():
    torch.manual_seed(0)
    model = FLAIR(demo_model_config(DemoConfig(vision_layers=1, text_layers=2))).eval()
    ids = tokenize_texts(['A small red star in the bottom left',
                          'There are five objects. The background is plain gray'])
    full = torch.cat([ids, torch.zeros(len(ids), 77 - ids.shape[1], dtype=ids.dtype)], 1)  # (2, 77)
    assert trim_padding(full).shape == ids.shape
    with torch.no_grad():
        torch.testing.assert_close(model.embed_text(ids), model.embed_text(full), rtol=1e-5, atol=1e-5)


def naive_fine_grained(scores, txt2img):
    """Loop version: t→i rank of each text's image among all images; i→t best rank of an image's texts,
    images with texts only."""
    t2i = [int((scores[:, t] > scores[txt2img[t], t]).sum()
               + ((scores[:, t] == scores[txt2img[t], t]) & (torch.arange(len(scores)) < txt2img[t])).sum())
           for t in range(scores.shape[1])]
    i2t = []
    for i in range(scores.shape[0]):
        own = [t for t in range(scores.shape[1]) if txt2img[t] == i]
        if not own: continue
        ranks = [int((scores[i] > scores[i, t]).sum()
                     + ((scores[i] == scores[i, t]) & (torch.arange(scores.shape[1]) < t)).sum()) for t in own]
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


def test_own_image_maps():
    torch.manual_seed(0)
    model = FLAIR(demo_model_config(DemoConfig(vision_layers=1, text_layers=1))).eval()
    images, ids, txt2img = (torch.randn(3, 3, 64, 64),
                            tokenize_texts(['A small red star in the center'] * 2 + ['There is one object']),
                            torch.tensor([2, 0, 1]))
    attention = own_image_maps(model, images, ids, txt2img, 'attention')
    similarity = own_image_maps(model, images, ids, txt2img, 'patch_cosine')
    assert attention.shape == similarity.shape == (3, 8, 8)
    with torch.no_grad():                                                  # each map is the one of its own image
        _, weights = model.pool(model.embed_text(ids[:1]), model.embed_image(images[2:3])[1], return_attention=True)
    torch.testing.assert_close(attention[0].flatten(), weights[0, 0, :-1], rtol=1e-5, atol=1e-5)
    assert similarity.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="expected one of"):
        own_image_maps(model, images, ids, txt2img, 'saliency')


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


@pytest.mark.parametrize('attribute', ['shape', 'colour', 'size', 'position'])
def test_swapped_sentences_change_one_attribute_and_are_false(attribute):
    from flair_min.demo import ATTRIBUTES, swapped_sentences
    split = make_eval_split(12, seed=5)
    keep, swapped = swapped_sentences(split, attribute, seed=1)
    assert len(keep) == int((split['sentence_object'] >= 0).sum())
    column = ATTRIBUTES.index(attribute)
    names = [split[f'{a}_names'] for a in ATTRIBUTES]
    for s, text in zip(keep, swapped):
        true_words = set(str(split['sentences'][s]).split()); new_words = set(text.split())
        assert true_words != new_words
        changed_name = [str(n) for n in names[column] if str(n) in text and str(n) not in str(split['sentences'][s])]
        assert changed_name, (split['sentences'][s], text)          # the new value of that attribute appears
        own = split['sentences'][split['sentence_image'] == split['sentence_image'][s]]
        assert text not in own                                       # and the swap is false of the image


def test_linear_probe_separates_signal_from_noise():
    from flair_min.demo import linear_probe
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g)
    y = torch.argmax(x[:, :5], dim=1)                                 # five classes, linear in x
    assert linear_probe(x, y) > 0.85
    assert linear_probe(torch.randn(600, 16, generator=g), y) < 0.35   # chance 0.2


def test_object_tokens_average_the_covered_patches():
    from flair_min.demo import object_tokens
    from flair_min.toyworld import patch_coverage
    split = make_eval_split(4, seed=2)
    torch.manual_seed(0); model = FLAIR(demo_model_config(DemoConfig(width=64, embed_dim=32))).eval()
    from flair_min.demo import eval_images
    images = eval_images(split)
    tokens, attributes = object_tokens(model, images, split)
    keep = np.flatnonzero(split['sentence_object'] >= 0)
    assert tokens.shape == (len(keep), 32) and attributes.shape == (len(keep), 4)
    with torch.no_grad(): _, local = model.embed_image(images)
    # the first object by a loop: weighted mean over its patches
    s = 0
    cover = patch_coverage(split['masks'][keep[s]][None], 8)[0].reshape(-1)
    expected = (torch.as_tensor(cover, dtype=torch.float32)[:, None]
                * local[int(split['sentence_image'][keep[s]])]).sum(0) / cover.sum()
    assert torch.allclose(tokens[s], expected, atol=1e-5)


def test_text_swap_similarity_against_a_loop():
    from flair_min.demo import swapped_sentences, text_swap_similarity
    split = make_eval_split(4, seed=2)
    torch.manual_seed(0); model = FLAIR(demo_model_config(DemoConfig(width=64, embed_dim=32))).eval()
    sims = text_swap_similarity(model, split, seed=4)
    keep, swapped = swapped_sentences(split, 'colour', seed=4)
    with torch.no_grad():
        cosines = [torch.nn.functional.cosine_similarity(model.embed_text(tokenize_texts([str(split['sentences'][s])])),
                                                         model.embed_text(tokenize_texts([t])))[0]
                   for s, t in zip(keep, swapped)]
    assert sims['colour'] == pytest.approx(float(torch.stack(cosines).mean()), abs=1e-5)
    assert all(-1 <= v <= 1 for v in sims.values())


def test_ablation_results_path_is_made_before_any_training(tmp_path, monkeypatch):
    "A results path that cannot be a folder fails at once, not after the ten trainings of the ablation."
    import flair_min.demo
    def refuse(*args, **kwargs): raise AssertionError('trained before the results folder was made')
    monkeypatch.setattr(flair_min.demo, 'train_demo_model', refuse)
    (tmp_path / 'taken').write_text('a file')
    with pytest.raises(FileExistsError, match='taken'):
        flair_min.demo.run_ablation(dict(quick=True, quiet=True, out=str(tmp_path / 'demo')),
                                    results_dir=tmp_path / 'taken')
