"""Benchmark readers on the real annotation excerpts (data/annotations/) and on fixtures in the
documented layouts, checked against an independent transcription of the official counting
(data_list → map_img_cap → extract_unique_img_list → remap_indices); the PASCAL VOC reader on a folder in the real
layout; and `flair-min eval` end to end on a tiny COCO-layout folder."""
import argparse, json, re, shutil, struct, zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from flair_min.cli import add_eval_arguments, main, run_eval
from flair_min.eval_sets import (BENCHMARKS, IGNORE_INDEX, ImageFiles, read_benchmark, read_coco, read_dci,
                                 read_docci, read_flickr30k, read_iiw, read_sharegpt4v, read_urban1k, read_voc)
from flair_min.captions import split_caption
from flair_min.model import FLAIR, FlairConfig, image_transform
from torch.utils.data import DataLoader

EXCERPTS = ROOT / 'data' / 'annotations'


def place(tmp_path, excerpt, *relative):
    target = tmp_path.joinpath(*relative); target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXCERPTS / excerpt, target)
    return tmp_path / relative[0]


def official_counting(data_list):
    "Images in order of first appearance of their image_id; each caption's image index (the official remap)."
    order = {}
    for entry in data_list: order.setdefault(entry['image_id'], len(order))
    return list(order), [order[entry['image_id']] for entry in data_list]


def test_coco_excerpt(tmp_path):
    root = place(tmp_path, 'coco_captions_val2017_excerpt.json', 'coco', 'annotations', 'captions_val2017.json')
    data = json.loads((EXCERPTS / 'coco_captions_val2017_excerpt.json').read_text())
    files = {im['id']: im['file_name'] for im in data['images']}
    data_list = [{'image_id': a['image_id'], 'caption': a['caption']} for a in data['annotations']
                 if a['image_id'] in files]
    image_ids, txt2img = official_counting(data_list)
    coco = read_coco(root)
    assert (len(coco.images), len(coco.texts)) == (40, 200)
    assert coco.txt2img == txt2img and coco.texts == [e['caption'] for e in data_list]
    assert coco.images == [root / 'images' / 'val2017' / files[i] for i in image_ids]
    assert coco.images[0].name != data['images'][0]['file_name']       # first appearance, not the image list order


def test_flickr30k_excerpt(tmp_path):
    flickr = read_flickr30k(place(tmp_path, 'flickr30k_val_excerpt.json', 'flickr30k-images', 'flickr30k_val.json'))
    assert (len(flickr.images), len(flickr.texts)) == (30, 150)
    assert flickr.txt2img == [i // 5 for i in range(150)]
    # relative to the folder above the root
    assert flickr.images[-1] == tmp_path / 'flickr30k-images' / '123244147.jpg'


def test_iiw_excerpt(tmp_path):
    root = place(tmp_path, 'iiw_finegrained_test_annotations_excerpt.json', 'iiw', 'test_annotations.json')
    annotations = json.loads((EXCERPTS / 'iiw_finegrained_test_annotations_excerpt.json').read_text())['annotations']
    image_ids, txt2img = official_counting(annotations)
    iiw = read_iiw(root)
    assert (len(iiw.images), len(iiw.texts)) == (4, 42)
    assert iiw.txt2img == txt2img and [a['caption_id'] for a in annotations] == list(range(42))
    assert iiw.images[0] == root / 'docci' / 'test_00731.jpg'


def test_urban1k_excerpt(tmp_path):
    urban = read_urban1k(place(tmp_path, 'urban1k_annotations_excerpt.json', 'Urban1k', 'annotations',
                               'annotations.json'))
    assert (len(urban.images), len(urban.texts)) == (30, 30) and urban.txt2img == list(range(30))
    assert urban.images[1] == tmp_path / 'Urban1k' / 'images' / '10.jpg'


def test_dci_excerpt_splits_with_fixture_annotations(tmp_path):
    root = place(tmp_path, 'dci_splits_excerpt.json', 'dci', 'densely_captioned_images', 'splits.json')
    splits = json.loads((EXCERPTS / 'dci_splits_excerpt.json').read_text())
    names = splits['train'] + splits['valid'] + splits['test']
    (root / 'densely_captioned_images' / 'annotations').mkdir()
    for i, name in enumerate(names):
        (root / 'densely_captioned_images' / 'annotations' / name).write_text(json.dumps(
            {'image': f'sa_{i}.jpg', 'short_caption': f'Short {i}. ', 'extra_caption': 'One.\nTwo </s> three...'}))
    dci = read_dci(root)
    assert (len(dci.images), len(dci.texts)) == (15, 15) and dci.txt2img == list(range(15))
    assert dci.texts[3] == '. '.join(split_caption('Short 3. \nOne.\nTwo </s> three...')) == 'Short 3. One. Two. three'
    assert dci.images[10] == root / 'densely_captioned_images' / 'photos' / 'sa_10.jpg'  # test split after valid


def write_voc(root, n=3):
    "A PASCAL VOC folder in the real layout: n random photos, palette-PNG labels (class 1 + 7i, a row of 255s)."
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


def test_voc_reader(tmp_path):
    root = write_voc(tmp_path / 'VOC2012')
    voc20, voc21 = read_voc(root), read_voc(root, background=True)
    assert (len(voc20), len(voc20.class_names), len(voc21.class_names)) == (3, 20, 21)
    assert sorted(voc20.label(2).unique().tolist()) == [14, IGNORE_INDEX]   # raw 15 (person) -> 14; background ignored
    assert sorted(voc21.label(2).unique().tolist()) == [0, 15, IGNORE_INDEX]
    (root / 'JPEGImages' / '2008_000001.jpg').unlink()
    with pytest.raises(FileNotFoundError, match='are missing'): read_voc(root)
    with pytest.raises(FileNotFoundError, match='VOC layout'): read_voc(tmp_path)


def test_docci_fixture(tmp_path):
    (tmp_path / 'annotations').mkdir()
    rows = [(3, 'test_3.jpg', 'A'), (3, 'test_3.jpg', 'B'), (1, 'test_1.jpg', 'C'), (3, 'test_3.jpg', 'D')]
    (tmp_path / 'annotations' / 'test_annotations.json').write_text(json.dumps(
        {'annotations': [{'image_id': i, 'image': f, 'caption': c} for i, f, c in rows]}))
    docci = read_docci(tmp_path)
    assert docci.txt2img == [0, 0, 1, 0] and docci.texts == ['A', 'B', 'C', 'D']
    assert docci.images == [tmp_path / 'images' / 'test_3.jpg', tmp_path / 'images' / 'test_1.jpg']


def test_sharegpt4v_fixture(tmp_path):
    entries = [{'image': f'sam/images/sa_{i}.jpg' if i % 2 else f'sam/sa_{i}.jpg',
                'conversations': [{'from': 'human', 'value': '<image>\nWhat is it?'},
                                  {'from': 'gpt', 'value': f'It is {i}.\nA 1.5 m pole.'}]}
               for i in range(1003)]
    (tmp_path / 'share4v_sam_10k.json').write_text(json.dumps(entries))
    share = read_sharegpt4v(tmp_path, 1000)
    assert (len(share.images), len(share.texts), share.name) == (1000, 1000, 'sharegpt4v-1k')
    assert share.texts[7] == 'It is 7. A 1. 5 m pole'
    assert share.images[:2] == [tmp_path / 'sam' / 'sa_0.jpg', tmp_path / 'sam' / 'sa_1.jpg']
    with pytest.raises(ValueError, match='1,003 entries, fewer than the 10,000'):
        read_benchmark('sharegpt4v-10k', tmp_path)


@pytest.mark.parametrize('name,expected', [
    ('coco', 'annotations/captions_val2017.json'), ('flickr30k', 'flickr30k_<split>.json'),
    ('docci', 'annotations/test_annotations.json'), ('iiw', '<root>/test_annotations.json'),
    ('urban1k', 'annotations/annotations.json'), ('dci', 'densely_captioned_images/splits.json'),
    ('sharegpt4v-1k', 'share4v_sam_10k.json')])
def test_missing_annotation_names_the_layout(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match='Expected layout') as error: read_benchmark(name, tmp_path / 'empty')
    assert expected in str(error.value)


def test_missing_images_name_the_layout(tmp_path):
    root = place(tmp_path, 'urban1k_annotations_excerpt.json', 'Urban1k', 'annotations', 'annotations.json')
    (root / 'images').mkdir()
    for i in range(29): Image.new('RGB', (4, 4)).save(root / 'images' / read_urban1k(root).images[i].name)
    with pytest.raises(FileNotFoundError,
                       match=r'(?s)1 of 30 image files are missing, e\.g\. .*124\.jpg.*<root>/images/<image>'):
        read_benchmark('urban1k', root)
    assert len(read_benchmark('urban1k', root, check_images=False).images) == 30
    assert set(BENCHMARKS) == {'coco', 'flickr30k', 'docci', 'iiw', 'urban1k', 'dci', 'sharegpt4v-1k', 'sharegpt4v-10k'}


def tiny_coco(root: Path, n_images=5):
    data = json.loads((EXCERPTS / 'coco_captions_val2017_excerpt.json').read_text())
    keep = list(dict.fromkeys(a['image_id'] for a in data['annotations']))[:n_images]  # first n images to appear
    data['images'] = [im for im in data['images'] if im['id'] in keep]
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] in keep]
    (root / 'annotations').mkdir(parents=True); (root / 'images' / 'val2017').mkdir(parents=True)
    (root / 'annotations' / 'captions_val2017.json').write_text(json.dumps(data))
    g = torch.Generator().manual_seed(0)
    for im in data['images']:
        (Image.fromarray(torch.randint(0, 256, (36, 44, 3), generator=g, dtype=torch.uint8).numpy())
         .save(root / 'images' / 'val2017' / im['file_name']))
    return root


@pytest.fixture(scope='module')
def eval_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('eval')
    torch.manual_seed(0)
    torch.save({'epoch': 1,
                'state_dict': {f'module.{k}': v
                               for k, v in FLAIR(replace(FlairConfig.tiny(), vocab_size=49408)).state_dict().items()}},
               tmp / 'tiny_clip_vocab.pt')
    return tmp, tiny_coco(tmp / 'coco')


@pytest.mark.parametrize('mode', ['flair', 'topk', 'global'])
def test_flair_min_eval_end_to_end(eval_setup, mode, capsys):
    tmp, root = eval_setup
    parser = add_eval_arguments(argparse.ArgumentParser(prog='flair-min eval'))
    output = tmp / f'{mode}.json'
    args = parser.parse_args(['--pretrained', str(tmp / 'tiny_clip_vocab.pt'), '--dataset', 'coco', '--root', str(root),
                              '--mode', mode, '--topk', '3', '--batch-size', '2', '--workers', '0', '--device', 'cpu',
                              '--output', str(output)])
    results = run_eval(args)
    printed = capsys.readouterr()
    assert json.loads(output.read_text()) == results
    assert (results['num_images'], results['num_texts'], results['mode']) == (5, 25, mode)
    assert 'text→image' in printed.out and 'image→text' in printed.out and str(output) in printed.out
    # the tqdm bar over 3 image batches
    assert f'{mode} scores' in printed.err and '3/3' in printed.err
    metrics = results['metrics']
    assert metrics['text_to_image_R@5'] == 1.0 and 1 <= metrics['image_to_text_mean_rank'] <= 25
    assert results['topk'] == (3 if mode == 'topk' else None)


def test_eval_refuses_a_model_whose_vocabulary_the_tokenizer_overflows(eval_setup, flair_tiny):
    tmp, root = eval_setup
    torch.save(flair_tiny['state_dict'], tmp / 'flair_tiny_weights.pt')
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(['--model', 'tiny', '--pretrained', str(tmp / 'flair_tiny_weights.pt'),
                              '--dataset', 'coco', '--root', str(root), '--workers', '0', '--device', 'cpu',
                              '--output', str(tmp / 'x.json')])
    with pytest.raises(ValueError, match="vocabulary has 1000 entries"): run_eval(args)


def test_eval_split_and_image_size_options(eval_setup, capsys):
    tmp, root = eval_setup
    parser = add_eval_arguments(argparse.ArgumentParser())
    common = ['--pretrained', str(tmp / 'tiny_clip_vocab.pt'), '--root', str(root), '--workers', '0', '--device', 'cpu']
    results = run_eval(parser.parse_args(['--dataset', 'coco', '--force-image-size', '48', '--output',
                                          str(tmp / 'at48.json'), *common]))
    assert results['num_images'] == 5 and results['split'] is None
    with pytest.raises(ValueError, match='only flickr30k'):
        run_eval(parser.parse_args(['--dataset', 'coco', '--split', 'test', *common]))


GOOD_ENTRY = {'image_id': 3, 'image': 'a.jpg', 'caption': 'A cat.'}
NO_CAPTION = {'image_id': 3, 'image': 'a.jpg'}
BAD_FILES = {  # reader -> (annotation file, an empty one, one whose entry lacks its caption, what that error names)
    'coco': ('annotations/captions_val2017.json', {'images': [{'id': 3, 'file_name': 'a.jpg'}], 'annotations': []},
             {'images': [{'id': 3, 'file_name': 'a.jpg'}], 'annotations': [{'image_id': 3, 'id': 9}]},
             "annotations[0] (id 9) has no 'caption'"),
    'flickr30k': ('flickr30k_val.json', [], [{'image': 'f/1.jpg', 'caption': ['x']}, {'image': 'f/2.jpg'}],
                  "entry 1 (image 'f/2.jpg') has no 'caption'"),
    'docci': ('annotations/test_annotations.json', {'annotations': []},
              {'annotations': [GOOD_ENTRY, NO_CAPTION]}, "annotations[1] (image_id 3) has no 'caption'"),
    'iiw': ('test_annotations.json', {'annotations': []}, {'annotations': [NO_CAPTION]},
            "annotations[0] (image_id 3) has no 'caption'"),
    'urban1k': ('annotations/annotations.json', {'annotations': []}, {'annotations': [NO_CAPTION]},
                "annotations[0] (image_id 3) has no 'caption'"),
    'dci': ('densely_captioned_images/splits.json', {'train': [], 'valid': [], 'test': []}, {'test': ['a.json']},
            "a.json: the annotation of image 0 has no 'extra_caption'"),
    'sharegpt4v-1k': ('share4v_sam_10k.json', [],
                      [{'image': 'sam/sa_1.jpg', 'conversations': [{'from': 'human', 'value': 'Describe it.'}]}],
                      "entry 0 (image 'sam/sa_1.jpg'): 'conversations' is a list of 1, "
                      "expected a question and an answer"),
}


def read_broken(name, root):
    "The benchmark `name` read from `root` (ShareGPT4V: its first entry only, so that a one-entry file is enough)."
    if name.startswith('sharegpt4v'): return read_sharegpt4v(root, 1)
    return read_benchmark(name, root, check_images=False)


def write_broken(tmp_path, relative, content):
    path = tmp_path / relative; path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize('name', BAD_FILES)
def test_malformed_json_names_the_file_and_the_layout(tmp_path, name):
    path = write_broken(tmp_path, BAD_FILES[name][0], '{"annotations": [{"image_id": 1, ')
    with pytest.raises(ValueError, match='not valid JSON') as error: read_broken(name, tmp_path)
    assert str(path) in str(error.value) and 'Expected layout:\n<root>/' in str(error.value)


@pytest.mark.parametrize('name', BAD_FILES)
def test_empty_annotation_list_names_the_file(tmp_path, name):
    path = write_broken(tmp_path, BAD_FILES[name][0], BAD_FILES[name][1])
    with pytest.raises(ValueError, match='is empty|name no annotation files') as error: read_broken(name, tmp_path)
    assert str(path) in str(error.value) and 'Expected layout' in str(error.value)


@pytest.mark.parametrize('name', BAD_FILES)
def test_entry_without_caption_names_the_file_and_the_entry(tmp_path, name):
    relative, _, content, expected = BAD_FILES[name]
    path = write_broken(tmp_path, relative, content)
    if name == 'dci':   # the caption lives in the image's own annotation file
        path = write_broken(tmp_path, 'densely_captioned_images/annotations/a.json',
                            {'image': 'sa_1.jpg', 'short_caption': 'A wall.'})
    with pytest.raises(ValueError) as error: read_broken(name, tmp_path)
    assert str(path) in str(error.value) and expected in str(error.value) and 'Expected layout' in str(error.value)


def test_wrong_kinds_of_values_are_named(tmp_path):
    write_broken(tmp_path, 'annotations/annotations.json', {'annotations': [{**GOOD_ENTRY, 'caption': None}]})
    with pytest.raises(ValueError, match=r"annotations\[0\] \(image_id 3\): 'caption' is null, expected a string"):
        read_urban1k(tmp_path)
    write_broken(tmp_path, 'annotations/annotations.json', [GOOD_ENTRY])
    with pytest.raises(ValueError, match="expected an object with a list under 'annotations', got a list of 1"):
        read_urban1k(tmp_path)
    write_broken(tmp_path, 'flickr30k_val.json', [{'image': 'f/1.jpg', 'caption': 'one string'}])
    with pytest.raises(ValueError, match=r"entry 0 \(image 'f/1.jpg'\): 'caption' is a string 'one string', "
                                         r"expected a list"):
        read_flickr30k(tmp_path)
    write_broken(tmp_path, 'annotations/captions_val2017.json',
                 {'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': [{'image_id': 2, 'caption': 'x'}]})
    with pytest.raises(ValueError, match="no annotation's image_id is the id of an entry of 'images'"):
        read_coco(tmp_path)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def write_broken_image(path: Path, kind: str) -> Path:
    "A benchmark image spoiled the ways downloads go wrong; a bomb: a PNG header claiming 100,000 × 100,000 pixels."
    Image.new('RGB', (44, 36), (200, 30, 30)).save(path)
    data = path.read_bytes()
    bomb = (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', 100_000, 100_000, 8, 2, 0, 0, 0))
            + png_chunk(b'IEND', b''))
    path.write_bytes({'truncated': data[:len(data) // 2], 'empty': b'', 'not-an-image': b'<html>Not Found</html>',
                      'bomb': bomb}[kind])
    return path


BROKEN_IMAGES = {'truncated': 'is truncated or corrupt', 'empty': 'is empty (0 bytes)',
                 'not-an-image': 'is not an image PIL can read',
                 'bomb': "is larger than PIL's decompression-bomb limit (Image size (10000000000 pixels) exceeds"}


@pytest.mark.parametrize('suffix', ['.jpg', '.png'])
@pytest.mark.parametrize('kind', BROKEN_IMAGES)
def test_broken_benchmark_image_names_the_file(tmp_path, kind, suffix):
    good = tmp_path / f'good{suffix}'; Image.new('RGB', (44, 36)).save(good)
    bad = write_broken_image(tmp_path / f'{kind}{suffix}', kind)
    images = ImageFiles([good, bad], image_transform(32))
    assert images[0].shape == (3, 32, 32)
    with pytest.raises(ValueError) as error: images[1]
    message = str(error.value)
    assert message.startswith(f'{bad} {BROKEN_IMAGES[kind]}') and message.endswith('re-download it or remove it')
    assert '\n' not in message
    with pytest.raises(ValueError, match=re.escape(BROKEN_IMAGES[kind])) as error:
        list(DataLoader(images, batch_size=2, num_workers=0))
    assert str(error.value) == message


def test_broken_image_in_a_loader_worker_still_names_the_file(tmp_path):
    bad = write_broken_image(tmp_path / 'cut.jpg', 'truncated')
    with pytest.raises(ValueError, match='is truncated or corrupt') as error:
        list(DataLoader(ImageFiles([bad], image_transform(32)), num_workers=1))
    assert str(bad) in str(error.value)


@pytest.mark.parametrize('workers', ['0', '1'])   # 1: raised in a loader worker, which torch wraps in its traceback
def test_flair_min_eval_on_a_truncated_image_prints_one_line(eval_setup, tmp_path, capsys, workers):
    tmp, root = eval_setup
    copy = shutil.copytree(root, tmp_path / 'coco')
    bad = write_broken_image(sorted((copy / 'images' / 'val2017').iterdir())[2], 'truncated')
    with pytest.raises(SystemExit) as exit_:
        main(['eval', '--pretrained', str(tmp / 'tiny_clip_vocab.pt'), '--dataset', 'coco', '--root', str(copy),
              '--workers', workers, '--device', 'cpu', '--output', str(tmp_path / 'x.json')])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'Traceback' not in err and 'Caught' not in err
    assert err.strip().splitlines()[-1].startswith(f'flair-min eval: error: {bad} is truncated or corrupt')
