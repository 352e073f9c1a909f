"""The small files under data/toy/ that the data tests read, written from the toy world (09_toyworld).

Regenerate the committed files (from the repository root) with `python tests/fixtures.py`; every test
run regenerates them into a temporary folder and compares them with what is committed
(tests/test_toyworld.py). The damaged-shard writers (`write_damaged_tar`, `write_damaged_targz`) write into a
test's own folder: none of their files is committed."""
import gzip, json, sys, tarfile
from dataclasses import replace
from pathlib import Path

from flair_min.shards import write_shard
from flair_min.toyworld import ToyWorldConfig, make_eval_split, save_eval_split, toy_sample, write_shards

ROOT = Path(__file__).resolve().parents[1]

BAD_KINDS = {  # kind -> how a good (image bytes, json bytes) sample is spoiled; None = member left out
    'corrupt-image': lambda img, rec: (img[:len(img) // 2], rec),
    'invalid-json': lambda img, rec: (img, rec[:len(rec) // 2]),
    'missing-caption': lambda img, rec: (img, b'{"source": "toyworld", "note": "this sample has no caption field"}'),
    'empty-caption': lambda img, rec: (img, b'{"caption": " . .  ."}'),
    'missing-image': lambda img, rec: (None, rec),
}
# in shard order; key = f'{position:03d}-{kind}'
BAD_SHARD_KINDS = ('good', 'corrupt-image', 'good', 'invalid-json', 'good', 'missing-caption',
                   'good', 'empty-caption', 'good', 'missing-image', 'good')

def bad_shard_samples(config: ToyWorldConfig = ToyWorldConfig(), first_index: int = 1000):
    "Samples of the bad-samples shard: good ones (scenes first_index, ...) with one of each bad kind between them."
    for j, kind in enumerate(BAD_SHARD_KINDS):
        sample = toy_sample(first_index + j, replace(config, image_format='jpg'))
        img, rec = sample['jpg'], json.dumps(sample['json']).encode('utf-8')
        img, rec = BAD_KINDS[kind](img, rec) if kind != 'good' else (img, rec)
        yield {'__key__': f'{j:03d}-{kind}', **({'jpg': img} if img is not None else {}), 'json': rec}

def good_samples(n: int = 8, config: ToyWorldConfig = ToyWorldConfig(), first_index: int = 2000):
    "`n` good toy-world samples (a jpg and a json each), as `write_shard` takes them."
    for i in range(first_index, first_index + n): yield toy_sample(i, replace(config, image_format='jpg'))

def write_damaged_tar(path, n: int = 8, member: int = 2) -> int:
    "A plain tar of `n` good samples whose `member`-th header (from 0) is garbage; returns that header's byte offset."
    write_shard(path, good_samples(n))
    with tarfile.open(path) as tar: offset = tar.getmembers()[member].offset
    data = bytearray(Path(path).read_bytes())
    data[offset:offset + 512] = b'garbage!' * 64                       # its checksum field no longer parses
    Path(path).write_bytes(bytes(data))
    return offset

def write_damaged_targz(path, n: int = 8) -> Path:
    "A gzip-compressed tar of `n` good samples with 64 of its compressed bytes, half-way through, overwritten."
    tar = Path(path).with_suffix('.tmp'); write_shard(tar, good_samples(n))
    data = bytearray(gzip.compress(tar.read_bytes(), mtime=0)); tar.unlink()
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)                       # decompresses to garbage, with no error there
    Path(path).write_bytes(bytes(data))
    return Path(path)

def write_fixtures(out_dir, config: ToyWorldConfig = ToyWorldConfig()) -> list[Path]:
    "Write the files of data/toy/ into `out_dir` (see the list above)."
    out_dir = Path(out_dir)
    paths = write_shards(out_dir, 24, config, samples_per_shard=12)
    paths += write_shards(out_dir, 8, config, samples_per_shard=8, prefix='toy-dreamlip', form='dreamlip', start=24)
    write_shard(out_dir / 'bad-samples.tar', bad_shard_samples(config)); paths.append(out_dir / 'bad-samples.tar')
    paths.append(save_eval_split(make_eval_split(16, config, seed=1), out_dir / 'toy-eval.npz'))
    return paths


if __name__ == '__main__':
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'data' / 'toy'
    for path in write_fixtures(out): print(path)
