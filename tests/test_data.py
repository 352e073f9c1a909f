"""The training-data pipeline (flair_min.data): every source gives the same batches, bad samples are
skipped and counted by kind (in the main process and across DataLoader workers), worker/rank splits
cover the data exactly once, epochs reshuffle, resampling gives exact epoch lengths, and the hub
path works offline on files in the hub's layouts."""
import csv, io, json, logging, random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from fixtures import write_damaged_tar, write_damaged_targz
from flair_min.captions import DREAMLIP_FIELDS
from flair_min.samples import SKIP_KINDS, SkipSample, is_blank, make_pipeline, raw_record, sentence_pool
from flair_min.data import (DROPPED, DataConfig, ShardStream, TableStream, TrainLoader, load_table, make_train_loader,
                            source_kind)
from flair_min.shards import expand_urls, tar_samples, write_shard
from flair_min.cc3m import cc3m_recap_loader
from flair_min.tokenizer import get_tokenizer

TOY = ROOT / 'data' / 'toy'
SMALL = dict(image_size=32, context_length=16, num_captions=4, seed=0)   # small batches keep the tests fast


def photo(seed=0, size=(40, 30), fmt='JPEG') -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    out = io.BytesIO(); image.save(out, fmt); return out.getvalue()


def record(i) -> dict:
    return {'raw_caption': [f'photo {i}'], 'shortIB_captions': [f'a red square {i}'],
            'longIB_captions': [f'In the image a square number {i}', 'It sits on a table'],
            'shortSV_captions': ['short'], 'longSV_captions': ['long one', 'long two'], 'shortLLA_captions': ['lla'],
            'longLLA_captions': ['lla long']}


def good(start, n, ext='jpg'):
    return [{'__key__': f'{i:05d}', ext: photo(i, fmt='PNG' if ext == 'png' else 'JPEG'), 'json': record(i)}
            for i in range(start, start + n)]


BAD = {'corrupt_image': {'jpg': photo()[:150], 'json': record(0)},
       'bad_json': {'jpg': photo(), 'json': b'{"raw_caption": ["cut'},
       'no_caption': {'jpg': photo(), 'json': {'url': 'https://x/0.jpg', 'key': '0'}},
       'empty_caption': {'jpg': photo(), 'json': {'caption': ' .\n. '}},
       'bad_caption': {'jpg': photo(), 'json': {'longSV_captions': ['ok', 7]}},
       'no_image': {'json': record(0)}}


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    "Four good shards (jpg, png, webp samples), one with every bad kind between good samples, one cut short."
    tmp = tmp_path_factory.mktemp('shards')
    write_shard(tmp / 'part-0.tar', good(0, 5))
    write_shard(tmp / 'part-1.tar', good(5, 5, 'png'))
    write_shard(tmp / 'part-2.tar', good(10, 5, 'webp'))
    write_shard(tmp / 'part-3.tar', [*good(15, 2), *({'__key__': k, **v} for k, v in BAD.items()), *good(17, 2)])
    write_shard(tmp / 'full-4.tar', good(19, 6))
    data = (tmp / 'full-4.tar').read_bytes()
    (tmp / 'part-4.tar').write_bytes(data[:len(data) // 2])                    # a shard that ends in the middle
    keys = {f'{i:05d}' for i in range(19)}
    kept_of_cut = {s['__key__'] for s in tar_samples(str(tmp / 'part-4.tar')) if '__skip__' not in s}
    return {'urls': str(tmp / 'part-{0..4}.tar'), 'keys': keys | kept_of_cut, 'dir': tmp}


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch[2]]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_bad_samples_skipped_and_counted(shards, num_workers):
    loader = make_train_loader(shards['urls'], batch_size=1, num_workers=num_workers, with_keys=True, **SMALL)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(shards['keys'])                               # every good sample once, no bad one
    assert loader.skipped() == {kind: 1 for kind in SKIP_KINDS}                 # each bad kind once (+ the cut shard)
    assert loader.counts()['ok'] == len(shards['keys'])
    assert 'skipped 7' in loader.skip_report()


def test_first_skips_logged_with_key_and_reason(shards, caplog):
    stream = ShardStream(str(shards['dir'] / 'part-3.tar'),
                         make_pipeline(**{k: SMALL[k] for k in ('image_size', 'context_length')}),
                         seed=0, shuffle=False, log_first=3)
    with caplog.at_level(logging.WARNING, logger='flair_min.data'): list(stream)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and 'corrupt_image' in messages[0] and "'corrupt_image'" in messages[0]
    assert 'part-3.tar' in messages[0] and 'counted, not logged' in messages[-1]


def test_epochs_reshuffle_with_persistent_workers(shards):
    loader = make_train_loader(shards['urls'], batch_size=1, num_workers=2, with_keys=True, shuffle_buffer=3, **SMALL)
    loader.set_epoch(0); epoch0 = keys_of(loader)
    loader.set_epoch(1); epoch1 = keys_of(loader)                               # as the trainer does before each pass
    assert sorted(epoch0) == sorted(epoch1) == sorted(shards['keys']) and epoch0 != epoch1
    assert loader.counts()['ok'] == 2 * len(shards['keys'])                     # counts accumulate over epochs
    again = make_train_loader(shards['urls'], batch_size=1, num_workers=2, with_keys=True, shuffle_buffer=3, **SMALL)
    again.set_epoch(1)
    assert keys_of(again) == epoch1                                             # seed + epoch fix the order


def test_the_loader_stays_at_its_epoch_until_told(shards):
    "The trainer owns the epoch: a pass does not move the loader on; set_epoch does, persistent workers included."
    loader = make_train_loader(shards['urls'], batch_size=1, num_workers=2, with_keys=True, shuffle_buffer=3, **SMALL)
    first, again = keys_of(loader), keys_of(loader)
    assert first == again and loader.dataset.epoch == 0
    loader.set_epoch(3)
    assert loader.dataset.epoch == 3 and keys_of(loader) != first and loader.dataset.epoch == 3
    assert not hasattr(loader, 'epoch')                                         # no second counter


def test_skipped_is_one_dict_of_every_kind(shards):
    loader = make_train_loader(str(shards['dir'] / 'part-3.tar'), batch_size=1, num_workers=0, **SMALL)
    list(loader)
    assert loader.skipped() == loader.dataset.skipped() == {kind: int(kind != 'bad_shard') for kind in SKIP_KINDS}


def test_the_rank_comes_from_the_one_rank_helper(shards, monkeypatch):
    "Without an explicit rank the stream asks losses.rank_and_world(); an explicit one is checked."
    import flair_min.data as data
    monkeypatch.setattr(data, 'rank_and_world', lambda: (1, 2))
    stream = ShardStream(shards['urls'], make_pipeline(32))
    assert (stream.rank, stream.world_size) == (1, 2)
    assert (ShardStream(shards['urls'], make_pipeline(32), rank=3, world_size=4).rank, stream.world_size) == (3, 2)
    with pytest.raises(ValueError, match='rank=4 with world_size=4: expected 0 <= rank < world_size'):
        ShardStream(shards['urls'], make_pipeline(32), rank=4, world_size=4)

def test_ranks_and_workers_split_the_shards(shards):
    parts = [keys_of(make_train_loader(shards['urls'], batch_size=1, num_workers=2, rank=r, world_size=2,
                                       with_keys=True, **SMALL))
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(shards['keys'])


def test_resampled_epochs_have_exact_length(shards):
    lengths = []
    for rank in range(2):
        loader = make_train_loader(shards['urls'], batch_size=4, num_workers=2, resampled=True, num_samples=30,
                                   shuffle_buffer=8, rank=rank, world_size=2, **SMALL)
        batches = list(loader)
        # ceil(30 / (2 ranks * 2 workers * 4)) = 2 per worker
        assert len(batches) == len(loader) == 4
        lengths.append(len(batches))
    assert lengths[0] == lengths[1]
    with pytest.raises(ValueError, match='num_samples'): make_train_loader(shards['urls'], resampled=True)


def test_crops_are_a_function_of_seed_and_epoch_and_leave_torch_alone(shards):
    # FLAIR's random resized crop, scale (0.9, 1)
    pipeline = make_pipeline(32, num_captions=2, context_length=16)
    def pixels(seed, epoch, torch_seed):
        torch.manual_seed(torch_seed)                                            # the global generator must not matter
        stream = ShardStream(str(shards['dir'] / 'full-4.tar'), pipeline, seed=seed, shuffle_buffer=3, with_keys=True)
        stream.set_epoch(epoch)
        return {key: image for image, _, key in stream}                          # key -> (3, 32, 32)
    first = pixels(0, 1, torch_seed=1)
    assert len(first) == 6
    for key, image in pixels(0, 1, torch_seed=2).items(): assert torch.equal(image, first[key]), key
    # another epoch
    assert any(not torch.equal(image, first[key]) for key, image in pixels(0, 2, torch_seed=1).items())
    # fresh entropy
    assert any(not torch.equal(image, first[key]) for key, image in pixels(None, 1, torch_seed=1).items())
    raw = {'jpg': photo(3, (300, 200)), 'json': json.dumps(record(3)).encode()}
    state = torch.get_rng_state()
    pipeline(raw, random.Random(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_only_skips_raise(tmp_path):
    write_shard(tmp_path / 'junk.tar', [{'__key__': f'{i}', 'jpg': b'x', 'json': record(i)} for i in range(5)])
    stream = ShardStream(str(tmp_path / 'junk.tar'), make_pipeline(32), max_consecutive_skips=5, log_first=0)
    with pytest.raises(RuntimeError, match='5 samples in a row'): list(stream)


def dreamlip_csv(path, urls):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['Image Path', *DREAMLIP_FIELDS])
        for url in urls:
            writer.writerow([url, 'alt text', 'a "short" one, with a comma', 'Long one.\nSecond line.</s>Third', 'sv',
                             'SV long. Two', 'lla', 'LLA long'])


def test_hub_path_offline(tmp_path):
    for j in range(2):
        write_shard(tmp_path / f'cc3m-train-{j:04d}.tar', [
            {'__key__': f'{i:09d}', 'jpg': photo(i), 'txt': f'alt {i}',
             'json': {'caption': f'alt {i}', 'url': f'https://img/{i}.jpg', 'key': f'{i:09d}', 'status': 'success'}}
            for i in range(4 * j, 4 * j + 4)])
    # none for image 7
    dreamlip_csv(tmp_path / 'captions.csv', [f'https://img/{i}.jpg' for i in [0, 1, 2, 3, 4, 5, 6, 99]])
    options = dict(image_shards=str(tmp_path / 'cc3m-train-{0000..0001}.tar'),
                   captions_csv=str(tmp_path / 'captions.csv'), progress=False)
    loader = cc3m_recap_loader(hub_dir=str(tmp_path / 'recap'), hub_options=options, batch_size=1, num_workers=0,
                               with_keys=True, **SMALL)
    assert sorted(keys_of(loader)) == [f'{i:09d}' for i in range(7)]
    manifest = json.loads((tmp_path / 'recap' / 'recap.json').read_text())
    assert manifest['samples'] == 7 and manifest['dropped'] == 1
    sample = json.loads(next(tar_samples(manifest['shards'][0]))['json'])
    assert sample['longIB_captions'] == ['Long one', 'Second line', 'Third'] and 'caption' not in sample
    assert sample['shortIB_captions'] == ['a "short" one, with a comma'] and sample['url'] == 'https://img/0.jpg'


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    "A hub download that breaks mid-way leaves no file (a partial one would be taken for a finished copy)."
    import flair_min.cc3m as cc3m
    class Broken(io.BytesIO):
        def read(self, *args): raise ConnectionError('connection reset by peer')
    monkeypatch.setattr(cc3m, 'open_stream', lambda url: Broken())
    with pytest.raises(ConnectionError, match='reset'): cc3m.download('hf://datasets/x/cc3m-train-0000.tar', tmp_path)
    assert list(tmp_path.iterdir()) == []

def test_table_sources(tmp_path):
    folder = tmp_path / 'folder'; folder.mkdir()
    rows = ([(f'{i}.jpg', photo(i), f'A photo {i}. Of a square.') for i in range(5)]
            + [('bad.jpg', b'\xff\xd8 no', 'x'), ('empty.jpg', photo(), '')])
    for name, data, _ in rows: (folder / name).write_bytes(data)
    with open(folder / 'metadata.csv', 'w', newline='') as f:
        writer = csv.writer(f); writer.writerow(['file_name', 'long_caption'])
        writer.writerows((n, c) for n, _, c in rows)
    table = load_table(folder, cache_dir=str(tmp_path / 'cache'))
    loader = make_train_loader(table, batch_size=2, num_workers=2, caption_column='long_caption', **SMALL)
    assert sum(len(images) for images, _ in loader) == 4                        # 5 good rows, per-worker drop_last
    # an empty CSV cell is a missing value
    assert loader.skipped()['corrupt_image'] == 1 and loader.skipped()['no_caption'] == 1
    assert loader.counts()['ok'] == 4 and loader.counts()[DROPPED] == 1             # the odd one, not trained on
    import pandas as pd
    frame = pd.DataFrame({'image': [{'bytes': photo(i), 'path': f'{i}.jpg'} for i in range(3)] + [None],
                          'longSV_captions': [['one', 'two']] * 3 + [['three']], 'raw_caption': ['r', None, 'r', 'r']})
    frame.to_parquet(tmp_path / 'pairs.parquet')
    loader = make_train_loader(str(tmp_path / 'pairs.parquet'), batch_size=1, num_workers=0, **SMALL)
    assert len(list(loader)) == 3 and loader.skipped()['no_image'] == 1
    with pytest.raises(ValueError, match='no caption column'): TableStream(table, make_pipeline(32))


def test_every_source_gives_the_same_batches(shards, tmp_path):
    frame_dir = tmp_path / 'parquet'; frame_dir.mkdir()
    import pandas as pd
    pd.DataFrame({'image': [{'bytes': photo(i), 'path': None} for i in range(4)], 'caption': ['A square. Red.'] * 4}) \
        .to_parquet(frame_dir / 'part.parquet')
    for source in [shards['urls'], str(frame_dir)]:
        images, texts = next(iter(make_train_loader(source, batch_size=2, num_workers=0, draft=True, **SMALL)))
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
        assert texts.shape == (2, 4, 16) and texts.dtype == torch.long


def test_sources_and_urls(shards):
    assert source_kind(shards['urls']) == source_kind(shards['dir']) == 'shards'
    assert source_kind('x.parquet') == 'table'
    with pytest.raises(ValueError, match='cc3m_recap_loader'): source_kind('cc3m-recap')
    assert len(expand_urls(str(shards['dir'] / 'part-*.tar'))) == 5
    assert expand_urls('a-{08..10}.tar::b.tar') == ['a-08.tar', 'a-09.tar', 'a-10.tar', 'b.tar']
    with pytest.raises(TypeError, match='unknown DataConfig fields'): make_train_loader(shards['urls'], num_captons=3)
    assert DataConfig().num_captions == 8 and DataConfig().batch_size == 128


@pytest.mark.skipif(not (TOY / 'bad-samples.tar').exists(), reason='the toy world has not written data/toy yet')
@pytest.mark.parametrize('num_workers', [0, 2])
def test_toy_world(num_workers):
    loader = make_train_loader(str(TOY / 'toy-train-*.tar'), batch_size=4, num_workers=num_workers, image_size=64,
                               seed=0)
    images, texts = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and texts.shape == (4, 8, 77)
    bad = make_train_loader(str(TOY / 'bad-samples.tar'), batch_size=1, num_workers=num_workers, **SMALL)
    kept = len(list(bad))
    assert kept >= 1
    assert {k: v for k, v in bad.skipped().items() if v} == {k: 1 for k in ('no_image', 'corrupt_image', 'bad_json',
                                                                            'no_caption', 'empty_caption')}


# ---------------------------------------------------------------- bad input: clear errors, honest counts

@pytest.mark.parametrize('num_workers', [0, 2])
def test_partial_batches_dropped_are_counted_not_kept(shards, num_workers):
    "drop_last throws away each process's last partial batch: those samples are 'dropped', not 'ok', and not skips."
    loader = make_train_loader(shards['urls'], batch_size=4, num_workers=num_workers, with_keys=True, **SMALL)
    delivered = read = 0
    for epoch in range(2):
        delivered += len(keys_of(loader))
        read += len(shards['keys']) + len(SKIP_KINDS)                           # good samples + one of each bad kind
        counts = loader.counts()
        assert counts['ok'] == delivered and delivered % 4 == 0                 # ok: what training received
        assert counts['ok'] + counts[DROPPED] + sum(loader.skipped().values()) == read
    assert counts[DROPPED] == 2 * len(shards['keys']) - delivered > 0
    assert loader.skipped() == {kind: 2 for kind in SKIP_KINDS}                 # dropped samples are not skips
    assert f'dropped {counts[DROPPED]} in partial batches' in loader.skip_report()


def test_epoch_report_is_a_warning_when_samples_were_skipped(shards, caplog):
    with caplog.at_level(logging.INFO, logger='flair_min.data'):
        list(make_train_loader(str(shards['dir'] / 'part-3.tar'), batch_size=1, num_workers=0, **SMALL))
        list(make_train_loader(str(shards['dir'] / 'part-0.tar'), batch_size=1, num_workers=0, **SMALL))
    reports = [r for r in caplog.records if 'data epoch 0 done' in r.getMessage()]
    assert [r.levelno for r in reports] == [logging.WARNING, logging.INFO]
    bad = reports[0].getMessage()
    assert all(f'{kind} 1' in bad for kind in SKIP_KINDS if kind != 'bad_shard'), bad


@pytest.mark.parametrize('field, value, message', [
    ('num_captions', 0, 'DataConfig.num_captions=0: expected an int >= 1'),
    ('batch_size', 0, 'DataConfig.batch_size=0: expected an int >= 1'),
    ('max_merged', 0, 'DataConfig.max_merged=0: expected an int >= 1'),
    ('num_workers', -1, 'DataConfig.num_workers=-1: expected an int >= 0'),
    ('image_size', 0, 'DataConfig.image_size=0: expected an int >= 1'),
    ('context_length', 1, 'DataConfig.context_length=1: expected an int >= 2 (room for SOT and EOT)'),
    ('context_length', 0, 'DataConfig.context_length=0: expected an int >= 2'),
    ('batch_size', 2.5, 'DataConfig.batch_size=2.5: expected an int'),
    ('num_samples', 0, 'DataConfig.num_samples=0: expected an int >= 1')])
def test_data_config_is_checked_in_the_main_process(shards, field, value, message):
    with pytest.raises(ValueError) as err: DataConfig(**{field: value})
    assert message in str(err.value)
    with pytest.raises(ValueError) as err: make_train_loader(shards['urls'], **({'num_workers': 2} | {field: value}))
    assert message in str(err.value)                                            # before any worker starts


def test_data_config_names_every_bad_field():
    with pytest.raises(ValueError) as err: DataConfig(batch_size=0, num_workers=-1, context_length=1, num_samples=0)
    for part in ('DataConfig.batch_size=0: expected an int >= 1', 'DataConfig.num_workers=-1: expected an int >= 0',
                 'DataConfig.context_length=1: expected an int >= 2', 'DataConfig.num_samples=0: expected an int >= 1'):
        assert part in str(err.value), str(err.value)


@pytest.mark.parametrize('bad', [dict(batch_size=0), dict(max_workers=-1), dict(num_samples=0), dict(shuffle_buffer=-1),
                                 dict(batch_size=2.5)])
def test_stream_numbers_are_checked_where_it_is_made(shards, bad):
    (field, value), = bad.items()
    with pytest.raises(ValueError, match=f'{field}={value}: expected an int'):
        ShardStream(shards['urls'], make_pipeline(32), **bad)


@pytest.mark.parametrize('content', [{}, {'notes.txt': 'hello'}, {'metadata.jsonl': '{"file_name": "a.jpg"}\n'},
                                     {'metadata.csv': 'file_name,caption\n'}])
def test_a_folder_without_images_says_what_was_looked_for(tmp_path, content):
    folder = tmp_path / 'my_data'; folder.mkdir()
    for name, text in content.items(): (folder / name).write_text(text)
    for load in (lambda: load_table(folder, cache_dir=str(tmp_path / 'cache')), lambda: make_train_loader(folder)):
        with pytest.raises(ValueError) as err: load()
        text = str(err.value)
        assert f"no training data in folder '{folder}'" in text and 'found no image files' in text, text
        assert 'metadata.jsonl or metadata.csv' in text and '*.parquet' in text and 'Instruction' not in text


def test_an_image_in_a_subfolder_is_enough(tmp_path):
    (tmp_path / 'my_data' / 'part').mkdir(parents=True)
    (tmp_path / 'my_data' / 'part' / '0.jpg').write_bytes(photo(0))
    (tmp_path / 'my_data' / 'metadata.jsonl').write_text('{"file_name": "part/0.jpg", "caption": "A square."}\n')
    assert len(load_table(tmp_path / 'my_data', cache_dir=str(tmp_path / 'cache'))) == 1


def test_lists_of_blank_sentences_are_empty_captions(tmp_path):
    "A DreamLIP list of only blanks and punctuation is as empty as the string ' . . ': skipped and counted."
    assert is_blank(['...', ' ']) and is_blank(' . .') and not is_blank(['...', 'a cat'])
    assert sentence_pool({'raw_caption': ['...', ' '], 'longIB_captions': ['A cat', ' ?! ']}) == ['A cat']
    blank = {'raw_caption': ['...', ' '], 'longIB_captions': [' ?! ', ''], 'longSV_captions': ' . '}
    samples = [*good(0, 2), {'__key__': 'blank', 'jpg': photo(), 'json': blank},
               {'__key__': 'dots', 'jpg': photo(), 'json': {'longLLA_captions': ['...']}}, *good(2, 1)]
    write_shard(tmp_path / 'blank.tar', samples)
    loader = make_train_loader(str(tmp_path / 'blank.tar'), batch_size=1, num_workers=0, with_keys=True, **SMALL)
    assert sorted(keys_of(loader)) == ['00000', '00001', '00002']
    assert {k: v for k, v in loader.skipped().items() if v} == {'empty_caption': 2}
    tok = get_tokenizer(context_length=SMALL['context_length'])
    pipeline = make_pipeline(32, num_captions=16, context_length=16)
    raw = {'jpg': photo(), 'json': json.dumps({'raw_caption': ['...', 'A cat', ' ']}).encode()}
    _, tokens = pipeline(raw, random.Random(0))
    assert {tok.decode(row) for row in tokens} <= {'a cat', 'a cat . a cat', 'a cat . a cat . a cat'}


# ---------------------------------------------------------------- hostile input: counted, never fatal, never silent

def test_deeply_nested_json_is_a_bad_json_skip(tmp_path):
    "100,000 nested '[' make json.loads raise RecursionError: one counted bad_json sample, not a dead run."
    nested = b'[' * 100_000
    with pytest.raises(SkipSample) as skip: raw_record({'json': nested})
    assert skip.value.kind == 'bad_json' and 'RecursionError' in skip.value.reason
    write_shard(tmp_path / 'nested.tar', [*good(0, 2), {'__key__': 'nested', 'jpg': photo(), 'json': nested},
                                           *good(2, 1)])
    loader = make_train_loader(str(tmp_path / 'nested.tar'), batch_size=1, num_workers=0, with_keys=True, **SMALL)
    assert sorted(keys_of(loader)) == ['00000', '00001', '00002']
    assert {k: v for k, v in loader.skipped().items() if v} == {'bad_json': 1}


@pytest.mark.filterwarnings('ignore:This DataLoader will create 65 worker processes')   # torch: more than the cores
def test_any_number_of_workers_has_a_counter_row(shards):
    "65 workers (one more than the counters once had rows for) all count their samples: no crash at step 65."
    loader = make_train_loader(shards['urls'], batch_size=1, num_workers=65, resampled=True, num_samples=65,
                               shuffle_buffer=0, **SMALL)
    assert len(list(loader)) == 65                                              # one sample from every worker
    assert loader.counts()['ok'] == 65
    del loader
    stream = ShardStream(shards['urls'], make_pipeline(32), max_workers=2)    # made by hand, with too few rows
    with pytest.raises(ValueError, match='num_workers=3: the stream counts samples for at most 2 workers'):
        TrainLoader(stream, batch_size=1, num_workers=3)


def test_damaged_shards_are_counted_from_where_they_broke(tmp_path, caplog):
    "A garbage header in a .tar, damaged bytes in a .tar.gz: the samples before are kept, the rest is one bad_shard."
    offset = write_damaged_tar(tmp_path / 'toy-000.tar')                      # its 3rd member: the 2nd sample's jpg
    write_damaged_targz(tmp_path / 'toy-001.tar.gz')                          # (the reader's side: test_shards.py)
    urls = [str(tmp_path / 'toy-000.tar'), str(tmp_path / 'toy-001.tar.gz')]
    loader = make_train_loader(urls, batch_size=1, num_workers=0, **SMALL)
    with caplog.at_level(logging.WARNING, logger='flair_min.data'): kept = len(list(loader))
    assert loader.skipped()['bad_shard'] == 2 and loader.counts()['ok'] == kept >= 1
    assert f'bad_shard: toy-000.tar: unreadable from byte {offset} on (' in caplog.text
    assert 'bad_shard: toy-001.tar.gz: unreadable from byte ' in caplog.text


def test_images_without_a_metadata_row_are_counted(tmp_path, caplog):
    "The imagefolder loader keeps only the images its metadata lists: the others are named and counted as no_caption."
    folder = tmp_path / 'my_data'; folder.mkdir()
    for i in range(5): (folder / f'{i}.jpg').write_bytes(photo(i))
    (folder / 'metadata.jsonl').write_text(''.join(json.dumps({'file_name': f'{i}.jpg', 'caption': f'A square {i}.'})
                                                   + '\n' for i in range(2)))
    with caplog.at_level(logging.WARNING, logger='flair_min.data'):
        table = load_table(folder, cache_dir=str(tmp_path / 'cache'))
    assert '3 of its 5 images have no row in its metadata' in caplog.text and '2.jpg, 3.jpg, 4.jpg' in caplog.text
    loader = make_train_loader(table, batch_size=1, num_workers=0, **SMALL)
    assert len(list(loader)) == 2 and {k: v for k, v in loader.skipped().items() if v} == {'no_caption': 3}
    assert len(list(loader)) == 2 and loader.skipped()['no_caption'] == 6        # counted in every epoch
