"""One stored sample to one training pair (flair_min.samples): the caption pool, then the crop's seed, then the
sub-captions and the tokenizer; non-RGB images converted before the crop, 16-bit grey scaled, not clipped; the
pipeline's numbers checked where it is made."""
import io, json, random

import numpy as np
import pytest
import torch
from PIL import Image

from test_data import photo, record
from flair_min.captions import caption_pool, sample_subcaptions
from flair_min.samples import as_rgb, make_pipeline, seeded
from flair_min.model import image_transform
from flair_min.tokenizer import get_tokenizer


def test_pipeline_is_caption_pool_then_sampling_then_tokenizer():
    raw = {'jpg': photo(3, (300, 200)), 'json': json.dumps(record(3)).encode()}
    pixels, tokens = make_pipeline(64, num_captions=8)(raw, random.Random(5))
    rng = random.Random(5)
    # first the crop's seed, then the sub-captions
    seed = rng.getrandbits(63)
    texts = sample_subcaptions(caption_pool(record(3)), 8, 3, rng)
    assert torch.equal(tokens, get_tokenizer()(texts))                           # (8, 77)
    torch.manual_seed(seed)
    assert torch.equal(pixels, image_transform(64, is_train=True)(Image.open(io.BytesIO(raw['jpg']))))


@pytest.mark.parametrize('mode', ['P', 'RGBA', 'LA', 'CMYK'])
def test_training_converts_to_rgb_before_the_crop(mode):
    "As the official loader (decode 'pilrgb', then the random crop): a non-RGB image is converted first."
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), 'RGBA')     # alpha varies per pixel
    image = ({'P': rgba.convert('RGB').convert('P', palette=Image.ADAPTIVE), 'RGBA': rgba}.get(mode)
             or rgba.convert(mode))
    fmt, key = ('JPEG', 'jpg') if mode == 'CMYK' else ('PNG', 'png')
    out = io.BytesIO(); image.save(out, fmt)
    decoded = Image.open(io.BytesIO(out.getvalue())); decoded.load()
    assert decoded.mode == mode
    raw = {key: out.getvalue(), 'json': json.dumps({'caption': 'A cat. A dog.'}).encode()}
    pixels, _ = make_pipeline(32, num_captions=2, context_length=16)(raw, random.Random(3))
    transform, seed = image_transform(32, is_train=True), random.Random(3).getrandbits(63)
    assert torch.equal(pixels, seeded(transform, seed, decoded.convert('RGB')))
    if mode in ('P', 'RGBA'):   # the order changes the pixels: palettes resize nearest-neighbour, RGBA with its alpha
        assert not torch.equal(pixels, seeded(transform, seed, decoded))


def test_pipeline_numbers_are_checked_where_it_is_made():
    with pytest.raises(ValueError, match='num_captions=0: expected an int >= 1'): make_pipeline(32, num_captions=0)
    with pytest.raises(ValueError, match='max_merged=0'): make_pipeline(32, max_merged=0)
    with pytest.raises(ValueError, match='context_length=1: expected an int >= 2'): make_pipeline(32, context_length=1)
    with pytest.raises(ValueError, match='num_captions=0: .*; .*max_merged=-1: expected an int >= 1'):
        make_pipeline(32, num_captions=0, max_merged=-1)


def test_sixteen_bit_images_are_scaled_not_clipped_to_white():
    "A 16-bit grey PNG opens as mode 'I;16'; PIL's convert('RGB') clips every value above 255 to white."
    values = np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16)
    out = io.BytesIO(); Image.fromarray(values).save(out, 'PNG')
    decoded = Image.open(io.BytesIO(out.getvalue())); decoded.load()
    assert decoded.mode == 'I;16'
    rgb = np.asarray(as_rgb(decoded)).astype(float)                             # (40, 56, 3)
    assert rgb.shape == (40, 56, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 1], values / 257, atol=1)
    for image in (Image.fromarray(values.astype(np.int32)), Image.fromarray(values.astype(np.float32))):   # 'I', 'F'
        assert image.mode in ('I', 'F')
        np.testing.assert_allclose(np.asarray(as_rgb(image))[..., 0], values / 257, atol=1)
    low = np.array([[0, 100, 200]], dtype=np.uint16)                           # 8-bit values in 16 bits: kept
    np.testing.assert_array_equal(np.asarray(as_rgb(Image.fromarray(low)))[..., 0], low)
    raw = {'png': out.getvalue(), 'json': b'{"caption": "A grey ramp."}'}
    pixels, _ = make_pipeline(32, num_captions=2, context_length=16)(raw, random.Random(0))
    assert pixels.max() - pixels.min() > 3                                      # a ramp, not a white square
