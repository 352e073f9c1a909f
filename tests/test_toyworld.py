"""The toy world: determinism, masks that match the drawing, captions that split back into their
sentences, shards that round-trip, the committed fixtures in data/toy/, and speed."""
import inspect, io, json, tarfile, time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from matplotlib.path import Path as PolygonPath
from PIL import Image

from conftest import ROOT
from flair_min.captions import caption_pool, split_caption
import flair_min.toyworld as toyworld
from flair_min.toyworld import (BACKGROUND_SENTENCE, COUNT_SENTENCE, EVAL_KEYS, PALETTE, SHAPE_MASKS, ToyWorldConfig,
                                image_bytes, load_eval_split, make_eval_split, make_scene, save_eval_split,
                                scene_layout, split_world, star_mask, toy_sample, triangle_mask, write_shards)
from flair_min.shards import write_shard
from fixtures import BAD_SHARD_KINDS, write_fixtures

TOY = ROOT / 'data' / 'toy'


def read_tar(path):
    with tarfile.open(path) as tar: return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def decode(data):
    try: return np.asarray(Image.open(io.BytesIO(data)).convert('RGB')).astype(int)
    except OSError: return None


def test_same_seed_same_scene_and_seed_matters():
    for i in (0, 5, 123456):
        a, b = make_scene(i), make_scene(i)
        assert np.array_equal(a.image, b.image) and a.sentences == b.sentences and np.array_equal(a.masks, b.masks)
    assert make_scene(0).caption != make_scene(0, ToyWorldConfig(seed=1)).caption
    assert len({make_scene(i).caption for i in range(50)}) == 50


def check_scene(scene, config):
    "Every property a scene must have; returns nothing, asserts."
    h = w = config.image_size
    objects = scene.layout.objects
    assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == (len(scene.sentences), h, w) and scene.masks.dtype == bool
    assert split_caption(scene.caption) == scene.sentences
    assert scene.sentence_object[:2] == [BACKGROUND_SENTENCE, COUNT_SENTENCE]
    assert sorted(scene.sentence_object[2:]) == list(range(len(objects)))
    assert config.min_objects <= len(objects) <= config.max_objects
    object_masks = scene.masks[2:][np.argsort(scene.sentence_object[2:])]  # (k, H, W) in object order
    assert object_masks.sum(0).max() == 1                                   # no overlap
    assert np.array_equal(scene.masks[0], ~object_masks.any(0)) and np.array_equal(scene.masks[1], object_masks.any(0))
    for obj, mask, in zip(objects, object_masks):
        assert mask.any(), obj
        # mask pixels carry the object's colour
        assert (scene.image[mask] == np.clip(np.add(PALETTE[obj.colour], obj.tint), 0, 255)).all(), obj
        cell = config.image_size / 3
        row, col = divmod(obj.cell, 3)
        ys, xs = np.nonzero(mask)
        assert row * cell - 1 <= ys.min() and ys.max() <= (row + 1) * cell, obj  # inside its cell
        assert col * cell - 1 <= xs.min() and xs.max() <= (col + 1) * cell, obj
    free = scene.image[~object_masks.any(0)]  # (n, 3): backgrounds are neutral grays, so no paint leaked out of a mask
    assert (free == free[:, :1]).all()


def test_scenes_default_world():
    config = ToyWorldConfig()
    for i in range(200): check_scene(make_scene(i, config), config)


@settings(max_examples=25, deadline=None)
@given(size=st.sampled_from([24, 32, 48, 64, 96, 128]), lo=st.integers(1, 9), extra=st.integers(0, 8),
       seed=st.integers(0, 2**31), index=st.integers(0, 10**6), twins=st.booleans())
def test_scenes_any_config(size, lo, extra, seed, index, twins):
    config = ToyWorldConfig(image_size=size, min_objects=lo, max_objects=min(9, lo + extra), seed=seed,
                            binding_twins=twins)
    check_scene(make_scene(index, config), config)


@pytest.mark.parametrize('r', [4.7, 8.5, 18.0, 30.0])
def test_star_and_triangle_match_polygons(r):
    grid = np.arange(-32, 33) + 0.37  # avoid pixel centres exactly on edges
    dx, dy = grid[None, :], grid[:, None]
    points = np.stack(np.broadcast_arrays(dx, dy), -1).reshape(-1, 2)
    angles, radii = np.arange(10) * np.pi / 5, np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    star = np.stack([radii * np.sin(angles), -radii * np.cos(angles)], -1)
    tri = [(0, -r), (r * 3**0.5 / 2, r / 2), (-r * 3**0.5 / 2, r / 2)]
    for fn, poly in [(star_mask, star), (triangle_mask, tri)]:
        assert np.array_equal(fn(dx, dy, r), PolygonPath(poly).contains_points(points).reshape(65, 65))


def test_every_shape_stays_in_its_radius():
    grid = np.arange(-40, 41) + 0.5
    dx, dy = grid[None, :], grid[:, None]
    for name, fn in SHAPE_MASKS.items():
        inside = fn(dx, dy, 20.0)
        assert inside.sum() > 100 and not (inside & ((abs(dx) > 20) | (abs(dy) > 20))).any(), name


def test_twins_share_the_bag_not_the_bindings():
    config = ToyWorldConfig(binding_twins=True)
    changed = 0
    for m in range(100):
        a, b = scene_layout(2 * m, config), scene_layout(2 * m + 1, config)
        for f in ('colour', 'shape', 'size', 'cell'):
            assert sorted(getattr(o, f) for o in a.objects) == sorted(getattr(o, f) for o in b.objects)
        assert (a.background, a.texture, a.order) == (b.background, b.texture, b.order)
        changed += [o.sentence for o in a.objects] != [o.sentence for o in b.objects]
    assert changed >= 98  # only a scene whose objects all look alike has no twin


def test_config_errors():
    for kwargs, word in [(dict(image_size=8), 'image_size'), (dict(max_objects=10), 'max_objects'),
                         (dict(shapes=('hexagon',)), 'hexagon'), (dict(colours=()), 'colours'),
                         (dict(colours_per_image=(3, 2)), 'colours_per_image'),
                         (dict(image_format='webp'), 'image_format')]:
        with pytest.raises(ValueError, match=word): ToyWorldConfig(**kwargs)
    with pytest.raises(ValueError, match='negative'): make_scene(-1)


def test_config_names_every_bad_field():
    with pytest.raises(ValueError) as err:
        ToyWorldConfig(image_size=8, colours=(), shapes=('hexagon',), image_format='gif', jpeg_quality=0)
    for part in ('ToyWorldConfig.image_size=8: expected an int >= 24', 'ToyWorldConfig.colours=()',
                 "ToyWorldConfig.shapes=('hexagon',): expected a non-empty subset of",
                 "ToyWorldConfig.image_format='gif'", 'ToyWorldConfig.jpeg_quality=0'):
        assert part in str(err.value), str(err.value)


@pytest.mark.parametrize('form', ['pixelprose', 'dreamlip'])
def test_shard_round_trip(tmp_path, form):
    config = ToyWorldConfig(seed=7)
    paths = write_shards(tmp_path, 9, config, samples_per_shard=4, form=form, start=100, prefix='x')
    assert [p.name for p in paths] == ['x-000000.tar', 'x-000001.tar', 'x-000002.tar']
    members = {k: v for p in paths for k, v in read_tar(p).items()}
    assert sorted(members) == sorted(f'{i:08d}.{e}' for i in range(100, 109) for e in ('jpg', 'json'))
    for i in range(100, 109):
        scene = make_scene(i, config)
        record = json.loads(members[f'{i:08d}.json'])
        assert set(record) == ({'caption'} if form == 'pixelprose' else {'raw_caption', 'longIB_captions'})
        assert caption_pool(record) == scene.sentences
        error = np.abs(decode(members[f'{i:08d}.jpg']) - scene.image)
        assert error.mean() < 3 and error.max() <= 40


def test_png_shards_are_lossless(tmp_path):
    config = ToyWorldConfig(image_format='png', image_size=48)
    members = read_tar(write_shards(tmp_path, 3, config, samples_per_shard=3)[0])
    for i in range(3): assert np.array_equal(decode(members[f'{i:08d}.png']), make_scene(i, config).image)
    assert np.array_equal(decode(image_bytes(make_scene(0, config).image, config)), make_scene(0, config).image)


def test_toy_shards_come_from_the_one_shard_writer(tmp_path):
    "The toy world has no tar writer of its own: its shards are shards.write_shard's, byte for byte."
    assert 'tarfile' not in inspect.getsource(toyworld)
    assert not any(hasattr(toyworld, name) for name in ('write_tar', 'tar_add', 'encode_image', 'patch_coverage'))
    assert toyworld.write_shard is write_shard                                  # the name it has is the writer's own
    [path] = write_shards(tmp_path / 'toy', 3, samples_per_shard=3, form='dreamlip')
    assert write_shard(tmp_path / 'same.tar', [toy_sample(i, ToyWorldConfig(), 'dreamlip') for i in range(3)]) == 3
    assert path.read_bytes() == (tmp_path / 'same.tar').read_bytes()


def test_parallel_writing_gives_the_same_bytes(tmp_path):
    one = write_shards(tmp_path / 'one', 30, samples_per_shard=10, workers=1)
    two = write_shards(tmp_path / 'two', 30, samples_per_shard=10, workers=2)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == [p.name for p in two]   # no temporaries


def test_eval_split_round_trip_and_consistency(tmp_path):
    split = make_eval_split(40)
    back = load_eval_split(save_eval_split(split, tmp_path / 'e.npz'))
    for k in EVAL_KEYS: assert np.array_equal(back[k], split[k]), k
    assert split_world(back) == ToyWorldConfig(seed=1, binding_twins=True)
    s, n = len(split['sentences']), len(split['images'])
    assert split['positives'].shape == (s, n) and split['masks'].shape == (s, 64, 64)
    for t in range(s):  # positives = "the identical sentence is in that image's caption"
        truth = [str(split['sentences'][t]) in split_caption(str(c)) for c in split['captions']]
        assert split['positives'][t].tolist() == truth
    obj = split['sentence_object'] >= 0
    names = [split[k] for k in ('shape_names', 'colour_names', 'size_names', 'position_names')]
    for t in np.flatnonzero(obj):
        shape, colour, size, pos = (str(nm[a]) for nm, a in zip(names, split['attributes'][t]))
        assert str(split['sentences'][t]) == f'A {size} {colour} {shape} {pos}'
    assert split['masks'].reshape(s, -1).any(1).all()
    assert np.array_equal(split['twin'], np.arange(n) ^ 1)
    with pytest.raises(ValueError, match='lacks'): save_eval_split({'images': split['images']}, tmp_path / 'bad.npz')


def test_fixtures_equal_what_the_code_writes(tmp_path):
    fresh = write_fixtures(tmp_path)
    committed = sorted(p.name for p in TOY.iterdir() if p.suffix in ('.tar', '.npz'))
    assert sorted(p.name for p in fresh) == committed
    for path in fresh:
        if path.suffix == '.npz':
            old, new = load_eval_split(TOY / path.name), load_eval_split(path)
            for k in EVAL_KEYS:
                if k == 'images': assert np.abs(old[k].astype(int) - new[k]).max() <= 2
                else: assert np.array_equal(old[k], new[k]), k
            continue
        old, new = read_tar(TOY / path.name), read_tar(path)
        assert list(old) == list(new), path.name
        for name in new:
            if old[name] == new[name]: continue
            a, b = decode(old[name]), decode(new[name])  # another libjpeg may encode differently: compare pixels
            assert name.endswith('.jpg') and (a is None) == (b is None), name
            assert a is None or np.abs(a - b).max() <= 2, name


def test_fixture_sizes():
    sizes = {p.name: p.stat().st_size for p in TOY.iterdir()}
    assert sum(sizes.values()) < 600_000, sizes
    n_images = sum(name.endswith('.jpg') for p in TOY.glob('*.tar') for name in read_tar(p))
    n_images += len(load_eval_split(TOY / 'toy-eval.npz')['images'])
    assert n_images <= 64


def test_bad_shard_has_each_bad_kind_between_good_ones():
    members = read_tar(TOY / 'bad-samples.tar')
    keys = list(dict.fromkeys(name.rsplit('.', 1)[0] for name in members))
    assert keys == [f'{j:03d}-{kind}' for j, kind in enumerate(BAD_SHARD_KINDS)]
    assert all(BAD_SHARD_KINDS[j] == 'good' for j in range(0, len(keys), 2))  # a good sample between any two bad ones

    def problem(key):
        if f'{key}.jpg' not in members: return 'missing-image'
        if decode(members[f'{key}.jpg']) is None: return 'corrupt-image'
        try: record = json.loads(members[f'{key}.json'])
        except json.JSONDecodeError: return 'invalid-json'
        if not any(k in record for k in ('caption', 'raw_caption', 'longIB_captions')): return 'missing-caption'
        if not split_caption(record['caption']): return 'empty-caption'
        assert caption_pool(record) == split_caption(record['caption'])
        return 'good'

    assert [problem(k) for k in keys] == list(BAD_SHARD_KINDS)
    assert Image.open(io.BytesIO(members['001-corrupt-image.jpg'])).size == (64, 64)  # the header still parses
    assert all(f'{k}.json' in members for k in keys)


def test_speed():
    "A scene takes about 0.5 ms; the best of 100 single calls is robust to load, and the bound is 20 times that."
    best = float('inf')
    for i in range(100):
        t0 = time.perf_counter(); make_scene(i); best = min(best, time.perf_counter() - t0)
    assert best < 1e-2, f'{best * 1e3:.2f} ms for the fastest of 100 scenes'
