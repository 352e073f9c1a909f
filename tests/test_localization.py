"""Localization (12_localization): the three maps against the official formulas (flair_maps.pt), their shapes and
ranges on a model with the CLIP vocabulary, mIoU on hand-made masks, the VOC reader on a folder in the real layout,
and the explorer's update without a browser."""
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFERENCE
from flair_min.localization import (MAP_KINDS, Explorer, centre_square, confusion_matrix, evaluate_segmentation,
                                    localization_maps, map_on_image, read_voc, segment, segmentation_metrics)
from flair_min.cli import main
from flair_min.model import FLAIR, FlairConfig

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


def write_voc(root, n=3):
    rng = np.random.default_rng(0)
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root / d).mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'JPEGImages' / f'2008_{i:06d}.jpg')
        label = np.zeros((30, 44), np.uint8); label[5:25, 10:30] = 1 + 7 * i; label[5, 10:30] = 255
        png = Image.fromarray(label, 'P'); png.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        png.save(root / 'SegmentationClass' / f'2008_{i:06d}.png')
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text(''.join(f'2008_{i:06d}\n' for i in range(n)))
    return root


def test_voc_reader_and_segmentation(tmp_path, clip_tiny):
    root = write_voc(tmp_path / 'VOC2012')
    voc20, voc21 = read_voc(root), read_voc(root, background=True)
    assert (len(voc20), len(voc20.class_names), len(voc21.class_names)) == (3, 20, 21)
    assert sorted(voc20.label(2).unique().tolist()) == [14, 255]      # raw 15 (person) -> 14; background ignored
    assert sorted(voc21.label(2).unique().tolist()) == [0, 15, 255]
    for kind in MAP_KINDS:
        r = evaluate_segmentation(clip_tiny, voc20, kind)
        assert 0 <= r['mIoU'] <= 1 and r['images'] == 3 and len(r['per_class_IoU']) == 20
    r21 = evaluate_segmentation(clip_tiny, voc21, background_threshold=2.0)   # above any cosine: all background
    assert r21['per_class_IoU']['background'] == pytest.approx(r21['pixel_accuracy']) and r21['mIoU'] < 1
    with pytest.raises(ValueError, match='background_threshold'): evaluate_segmentation(clip_tiny, voc21)
    (root / 'JPEGImages' / '2008_000001.jpg').unlink()
    with pytest.raises(FileNotFoundError, match='are missing'): read_voc(root)
    with pytest.raises(FileNotFoundError, match='VOC layout'): read_voc(tmp_path)


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
