"""Shard I/O (flair_min.shards): URL patterns, reading tar shards (damaged ones counted from the byte they broke at,
gzip too) and writing them through the one atomic writer; and the size of the data modules' APIs."""
import gzip, importlib, io, os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from fixtures import write_damaged_tar, write_damaged_targz
from flair_min.checkpoint import temporary_path
from flair_min.shards import expand_braces, expand_urls, split_member_name, tar_samples, write_shard


def photo(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(out, 'JPEG')
    return out.getvalue()


def samples(n, start=0):
    return [{'__key__': f'{i:05d}', 'jpg': photo(i), 'json': {'caption': f'A square {i}.'}, 'txt': f'alt {i}'}
            for i in range(start, start + n)]


@pytest.mark.parametrize('module, budget, lines', [('shards', 7, 450), ('cc3m', 4, 450), ('toyworld', 10, 450),
                                                   ('data', 9, 525)])   # data: pipeline, counts, two streams, loader
def test_each_module_teaches_a_small_api(module, budget, lines):
    mod = importlib.import_module(f'flair_min.{module}')
    assert len(mod.__all__) <= budget, mod.__all__
    assert len((ROOT / 'flair_min' / f'{module}.py').read_text().splitlines()) <= lines


def test_round_trip_and_member_names(tmp_path):
    assert write_shard(tmp_path / 'a.tar', samples(4)) == 4
    back = list(tar_samples(str(tmp_path / 'a.tar')))
    assert [s['__key__'] for s in back] == [f'{i:05d}' for i in range(4)]
    assert back[1]['json'] == b'{"caption": "A square 1."}' and back[1]['txt'] == b'alt 1'
    assert back[1]['jpg'] == photo(1) and back[1]['__url__'] == str(tmp_path / 'a.tar')
    assert split_member_name('a/0001.seg.PNG') == ('a/0001', 'seg.png')
    again = write_shard(tmp_path / 'b.tar', samples(4))
    assert again == 4 and (tmp_path / 'a.tar').read_bytes() == (tmp_path / 'b.tar').read_bytes()   # reproducible


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    "The shard appears whole or not at all: an error mid-way leaves neither the shard nor a temporary file."
    def broken():
        yield from samples(2)
        raise RuntimeError('the source broke')
    write_shard(tmp_path / 'kept.tar', samples(1))
    before = (tmp_path / 'kept.tar').read_bytes()
    for name in ('new.tar', 'kept.tar'):
        with pytest.raises(RuntimeError, match='the source broke'): write_shard(tmp_path / name, broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['kept.tar']
    assert (tmp_path / 'kept.tar').read_bytes() == before                      # the old shard is still whole


def test_a_planted_link_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / 'victim.txt'; victim.write_text('precious')
    shard = tmp_path / 'x.tar'
    for tmp in (shard.with_name(shard.name + '.part'), temporary_path(shard)): os.symlink(victim, tmp)
    write_shard(shard, samples(2))
    assert victim.read_text() == 'precious'
    assert [s['__key__'] for s in tar_samples(str(shard))] == ['00000', '00001']


def test_urls():
    assert expand_braces('s-{8..10}.tar') == ['s-8.tar', 's-9.tar', 's-10.tar']
    assert expand_urls('a-{08..10}.tar::b.tar') == ['a-08.tar', 'a-09.tar', 'a-10.tar', 'b.tar']
    with pytest.raises(ValueError, match='unbalanced'): expand_braces('s-{0..3.tar')
    with pytest.raises(ValueError, match='no file matches'): expand_urls('/nonexistent/dir/*.tar')


def test_damaged_shards_end_in_one_bad_shard_record(tmp_path):
    "A garbage header in a .tar, damaged bytes in a .tar.gz: the samples before are kept, the rest is one record."
    offset = write_damaged_tar(tmp_path / 'toy-000.tar')                      # its 3rd member: the 2nd sample's jpg
    write_damaged_targz(tmp_path / 'toy-001.tar.gz')
    for name in ('toy-000.tar', 'toy-001.tar.gz'):
        out = list(tar_samples(str(tmp_path / name)))
        skips = [s['__skip__'] for s in out if '__skip__' in s]
        assert len(skips) == 1 and skips[0][0] == 'bad_shard' and '__skip__' in out[-1], (name, skips)
        assert f'{name}: unreadable from byte ' in skips[0][1] and 'the rest of the shard' in skips[0][1], skips
    out = list(tar_samples(str(tmp_path / 'toy-000.tar')))
    assert [s['__key__'] for s in out][:-1] == ['00002000']
    assert f'unreadable from byte {offset} on (' in out[-1]['__skip__'][1]
    assert list(tar_samples(str(tmp_path / 'missing.tar')))[0]['__skip__'][0] == 'bad_shard'


def test_whole_and_cut_gzip_shards(tmp_path):
    "A good .tar.gz reads whole with no skip; one cut short is a bad_shard after its complete samples."
    write_shard(tmp_path / 'good.tar', samples(6))
    data = gzip.compress((tmp_path / 'good.tar').read_bytes(), mtime=0)
    (tmp_path / 'good.tar.gz').write_bytes(data)
    assert [s['__key__'] for s in tar_samples(str(tmp_path / 'good.tar.gz'))] == [f'{i:05d}' for i in range(6)]
    (tmp_path / 'cut.tar.gz').write_bytes(data[:len(data) * 2 // 3])
    out = list(tar_samples(str(tmp_path / 'cut.tar.gz')))
    assert out[-1]['__skip__'][0] == 'bad_shard' and len(out) > 1 and 'cut.tar.gz: unreadable' in out[-1]['__skip__'][1]
