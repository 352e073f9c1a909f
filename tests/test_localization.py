"""Localization (14_localization): the three maps against the official formulas (flair_maps.pt), their shapes and
ranges on a model with the CLIP vocabulary, overlays scaled as the official pictures, the pointing game, mIoU on
hand-made masks and on a VOC folder in the real layout, and the explorer's update without a browser."""
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFERENCE
from test_eval_sets import write_voc
from flair_min.eval_sets import read_voc
from flair_min.localization import (MAP_KINDS, Explorer, centre_square, class_embeddings, confusion_matrix,
                                    evaluate_segmentation, localization_maps, map_on_image, overlay, patch_coverage,
                                    pointing_game, segment, segmentation_metrics)
from flair_min.cli import main
from flair_min.model import FLAIR, FlairConfig
from flair_min.toyworld import make_scene

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def maps_ref():
    return torch.load(REFERENCE / 'flair_maps.pt', weights_only=True)


@pytest.fixture(scope='module')
def tiny(flair_tiny):
    return FLAIR.from_state_dict(flair_tiny['state_dict']).eval()


@pytest.fixture(scope='module')
def clip_tiny():
    torch.manual_seed(0)
    return FLAIR(FlairConfig.resolve({'preset': 'tiny', 'vocab_size': 49408})).eval()


@pytest.mark.parametrize('batch_size', [1, 2, 16])
def test_maps_equal_the_official_formulas(tiny, maps_ref, batch_size):
    images, texts = maps_ref['images'], maps_ref['texts']
    attention, zero = localization_maps(tiny, images, texts, 'attention', batch_size=batch_size, zero_slot=True)
    torch.testing.assert_close(torch.cat([attention, zero[..., None]], -1), maps_ref['attention_maps'],
                               atol=1e-5, rtol=0)
    for head in range(8):
        m, z = localization_maps(tiny, images, texts, 'attention', head=head, batch_size=batch_size, zero_slot=True)
        torch.testing.assert_close(torch.cat([m, z[..., None]], -1), maps_ref['attention_maps_per_head'][:, head],
                                   atol=1e-5, rtol=0)
    patchwise = localization_maps(tiny, images, texts, 'patchwise', batch_size=batch_size)
    torch.testing.assert_close(patchwise, maps_ref['patchwise_similarity'].transpose(1, 2), atol=1e-5, rtol=0)


def test_map_shapes_and_ranges(tiny, maps_ref):
    images, texts = maps_ref['images'], maps_ref['texts']
    for kind in MAP_KINDS:
        maps = localization_maps(tiny, images, texts, kind)
        assert maps.shape == (3, 6, 16)
        assert maps.abs().max() <= 1 + 1e-5
    attention, zero = localization_maps(tiny, images, texts, zero_slot=True)
    torch.testing.assert_close(attention.sum(-1) + zero, torch.ones(3, 6))       # weights and zero slot sum to 1


def test_bad_inputs(tiny, maps_ref):
    images, texts = maps_ref['images'], maps_ref['texts']
    with pytest.raises(ValueError, match="expected one of"): localization_maps(tiny, images, texts, 'gradcam')
    with pytest.raises(ValueError, match='head=9'): localization_maps(tiny, images, texts, head=9)
    with pytest.raises(ValueError, match='token ids'): localization_maps(tiny, images, texts[0])


def test_alignment_on_non_square_images():
    assert centre_square(640, 480) == (80, 0, 480) and centre_square(480, 640) == (0, 80, 480)
    heat = map_on_image(torch.tensor([0., 1., 0., 0.]), 12, 8)                 # a 2 × 2 grid on the 8 × 8 centre
    assert np.isnan(heat[:, :2]).all() and np.isnan(heat[:, 10:]).all() and not np.isnan(heat[:, 2:10]).any()
    assert heat[:4, 6:10].mean() > heat[:4, 2:6].mean()                        # the top-right patch is the hot one


def test_overlays_scale_as_the_official_pictures():
    "Default: negatives to 0, then ÷ max (the official pictures); min–max and the raw map on request."
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    grid = torch.tensor([-0.5, 0.1, 0.25, 0.5])                               # a 2 × 2 map with a negative patch
    image = np.zeros((2, 2, 3), np.uint8)                                      # one pixel per patch: no interpolation
    expected = {'official': [[0, 0.2], [0.5, 1]], 'minmax': [[0, 0.6], [0.75, 1]], None: [[-0.5, 0.1], [0.25, 0.5]]}
    labels = {'official': '÷ max', 'minmax': 'min–max', None: 'as computed'}
    fig, ax = plt.subplots()
    try:
        for normalise, heat in expected.items():
            np.testing.assert_allclose(map_on_image(grid, 2, 2, normalise), heat, atol=1e-6)
            np.testing.assert_allclose(overlay(ax, image, grid, normalise=normalise), heat, atol=1e-6)
            assert labels[normalise] in ax.get_xlabel(), ax.get_xlabel()        # the figure says how it is scaled
        np.testing.assert_allclose(map_on_image(grid, 2, 2), expected['official'], atol=1e-6)   # the default
        np.testing.assert_allclose(overlay(ax, image, grid), expected['official'], atol=1e-6)
        attention = torch.tensor([0.1, 0.2, 0.05, 0.4])                         # weights: ÷ max only
        np.testing.assert_allclose(map_on_image(attention, 2, 2), [[0.25, 0.5], [0.125, 1]], atol=1e-6)
        assert (map_on_image(-grid.abs(), 2, 2) == 0).all()                     # nothing above 0: nothing drawn
        for bad in ('max', True, 'min-max'):
            with pytest.raises(ValueError, match=rf"normalise={bad!r}: expected one of \('official', 'minmax', None\)"):
                overlay(ax, image, grid, normalise=bad)
    finally: plt.close(fig)


def test_patch_coverage_and_pointing_game():
    scene = make_scene(11)
    coverage = patch_coverage(scene.masks, 8)  # (S, 8, 8)
    assert coverage.shape == (len(scene.sentences), 8, 8)
    assert np.allclose(coverage.sum((1, 2)) * 64, scene.masks.sum((1, 2)))
    assert pointing_game(coverage, scene.masks).all()
    assert not pointing_game(-coverage[2:], scene.masks[2:]).any()
    with pytest.raises(ValueError, match='patches of 7'): patch_coverage(scene.masks, 7)


def test_token_ids_outside_the_vocabulary_name_the_model(tiny, maps_ref):
    "Token ids the model cannot embed (CLIP's BPE on the 1,000-token tiny model) fail with one clear error."
    images, texts = maps_ref['images'], maps_ref['texts']
    vocabulary = r"texts: got token id \d+, but the model's vocabulary has 1000 entries \(ids 0 \.\. 999\)"
    too_big = texts.clone(); too_big[1, 2] = 1000
    with pytest.raises(ValueError, match=vocabulary): localization_maps(tiny, images, too_big)
    with pytest.raises(ValueError, match=vocabulary): class_embeddings(tiny, ['dog'])
    photo = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=vocabulary): Explorer(tiny, [photo]).compute()


def test_miou_by_hand():
    truth = torch.tensor([[0, 0, 1], [2, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 1]])
    conf = confusion_matrix(pred, truth, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    m = segmentation_metrics(conf)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 1 / (1 + 2 - 1) = 1/2; class 2: 1 / (2 + 1 - 1) = 1/2
    assert m['per_class_IoU'] == pytest.approx({'0': 1 / 3, '1': 1 / 2, '2': 1 / 2})
    assert m['mIoU'] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3) and m['pixel_accuracy'] == pytest.approx(3 / 5)
    perfect = segmentation_metrics(confusion_matrix(truth.clamp(max=2), truth.clamp(max=2), 3))
    assert perfect['mIoU'] == 1.0
    zeros = torch.zeros(2, 2, dtype=torch.long)
    missing = segmentation_metrics(confusion_matrix(zeros, zeros, 4))
    assert missing['mIoU'] == 1.0 and math.isnan(missing['per_class_IoU']['3'])  # absent classes: no IoU, not 0


def test_segment_with_background_threshold():
    scores = torch.tensor([[[0.2, 0.9, 0.5, 0.1], [0.1, 0.3, 0.6, 0.05]]])      # (1, 2 classes, 2 × 2 patches)
    assert segment(scores, (2, 2)).tolist() == [[[0, 0], [1, 0]]]
    assert segment(scores, (2, 2), background_threshold=0.4).tolist() == [[[0, 1], [2, 0]]]


def test_segmentation_of_a_voc_folder(tmp_path, clip_tiny):
    root = write_voc(tmp_path / 'VOC2012')
    voc20, voc21 = read_voc(root), read_voc(root, background=True)
    for kind in MAP_KINDS:
        r = evaluate_segmentation(clip_tiny, voc20, kind)
        assert 0 <= r['mIoU'] <= 1 and r['images'] == 3 and len(r['per_class_IoU']) == 20
    r21 = evaluate_segmentation(clip_tiny, voc21, background_threshold=2.0)   # above any cosine: all background
    assert r21['per_class_IoU']['background'] == pytest.approx(r21['pixel_accuracy']) and r21['mIoU'] < 1
    with pytest.raises(ValueError, match='background_threshold'): evaluate_segmentation(clip_tiny, voc21)


def test_explorer_update_without_a_browser(clip_tiny):
    photo = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    explorer = Explorer(clip_tiny, [photo, photo[::-1].copy()], text='a red circle')
    seen = []
    for image, kind, head, text in [(1, 'attention', None, 'a red circle'), (1, 'attention', 2, 'a red circle'),
                                    (0, 'patchwise', None, 'a blue square'), (0, 'patch_cosine', None, 'a dog')]:
        explorer.image.value, explorer.kind.value, explorer.head.value, explorer.text.value = image, kind, head, text
        state = explorer.compute()
        assert (state['kind'], state['head'], state['text']) == (kind, head, text) and state['map'].shape == (16,)
        assert np.array_equal(state['image'], explorer.images[image])
        seen.append(state['map'])
    assert not torch.equal(seen[0], seen[1])                                    # one head differs from the mean
    fig = explorer.figure()
    assert len(fig.axes) == 1 and fig.axes[0].get_title().startswith('a dog')
    explorer.add_upload([{'content': _png(photo)}])
    assert len(explorer.images) == 3 and explorer.image.value == 2 and explorer.last['image'].shape == (40, 60, 3)


def _png(array) -> bytes:
    import io
    out = io.BytesIO(); Image.fromarray(array).save(out, 'PNG'); return out.getvalue()


def test_head_must_be_none_or_an_integer_in_range(tiny, maps_ref):
    images, texts = maps_ref['images'], maps_ref['texts']
    for head in (1.5, 99, 8, -1, True, '2'):
        with pytest.raises(ValueError, match=rf"head={head!r}: expected None \(the heads' mean\) or an integer "
                                             r"in \[0, 8\)"):
            localization_maps(tiny, images, texts, head=head)


@pytest.fixture(scope='module')
def nan_clip_tiny():
    "A tiny FLAIR with the CLIP vocabulary and every weight NaN: what a diverged run leaves behind."
    torch.manual_seed(0)
    model = FLAIR(FlairConfig.resolve({'preset': 'tiny', 'vocab_size': 49408})).eval()
    with torch.no_grad():
        for p in model.parameters(): p.fill_(math.nan)
    return model


NAN_MAPS = r"maps: \d+ of \d+ values are not finite \(nan\); expected finite maps: the model's weights or inputs hold"


def test_nan_model_maps_fail_instead_of_drawing_black(nan_clip_tiny, maps_ref):
    images, texts = maps_ref['images'], torch.randint(0, 49408, (2, 16))
    for kind in MAP_KINDS:
        with pytest.raises(ValueError, match=NAN_MAPS): localization_maps(nan_clip_tiny, images, texts, kind)
    with pytest.raises(ValueError, match=NAN_MAPS): localization_maps(nan_clip_tiny, images, texts, zero_slot=True)


def test_nan_model_segmentation_fails(tmp_path, nan_clip_tiny):
    voc20 = read_voc(write_voc(tmp_path / 'VOC2012', n=1))
    for kind in MAP_KINDS:
        with pytest.raises(ValueError, match=NAN_MAPS): evaluate_segmentation(nan_clip_tiny, voc20, kind)


def test_nan_model_in_the_explorer_prints_one_line(nan_clip_tiny, capsys):
    photo = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    explorer = Explorer(nan_clip_tiny, [photo], text='a red circle')
    with pytest.raises(ValueError, match=NAN_MAPS): explorer.compute()
    capsys.readouterr()
    explorer.update()                       # no kernel: what the output area would show goes to stdout
    shown = capsys.readouterr().out.replace('\x1b[2K', '').replace('\r', '').strip()
    assert re.fullmatch(NAN_MAPS + r".*", shown) and '\n' not in shown and 'Image object' not in shown


def test_nan_model_in_flair_min_visualize_prints_one_line(tmp_path, nan_clip_tiny, capsys):
    torch.save({'state_dict': nan_clip_tiny.state_dict()}, tmp_path / 'nan.pt')
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / 'p.png')
    with pytest.raises(SystemExit) as exit_:
        main(['visualize', '--pretrained', str(tmp_path / 'nan.pt'), '--image', str(tmp_path / 'p.png'),
              '--text', 'a dog', '--out', str(tmp_path / 'maps'), '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '\n' not in err and re.match('flair-min visualize: error: ' + NAN_MAPS, err)
    assert not list((tmp_path / 'maps').glob('*.png'))


@pytest.mark.parametrize('which', ['JPEGImages/2008_000001.jpg', 'SegmentationClass/2008_000001.png'])
def test_truncated_voc_file_names_the_file(tmp_path, clip_tiny, which):
    root = write_voc(tmp_path / 'VOC2012')
    data = (root / which).read_bytes(); (root / which).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(root / which))} is truncated or corrupt .*"
                                         "re-download it or remove it$"):
        evaluate_segmentation(clip_tiny, read_voc(root))
