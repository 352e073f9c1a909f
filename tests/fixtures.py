"""The small files under data/toy/ that the data tests read, written from the toy world (07_toyworld).

Regenerate the committed files (from the repository root) with `python tests/fixtures.py`; every test
run regenerates them into a temporary folder and compares them with what is committed
(tests/test_toyworld.py)."""
import sys
from dataclasses import replace
from pathlib import Path

from flair_min.toyworld import (ToyWorldConfig, make_eval_split, sample_members, save_eval_split, write_shards,
                                write_tar)

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

def bad_shard_members(config: ToyWorldConfig = ToyWorldConfig(), first_index: int = 1000):
    "Members of the bad-samples shard: good samples (scenes first_index, ...) with one of each bad kind between them."
    for j, kind in enumerate(BAD_SHARD_KINDS):
        (_, img), (_, rec) = sample_members(first_index + j, replace(config, image_format='jpg'))
        img, rec = BAD_KINDS[kind](img, rec) if kind != 'good' else (img, rec)
        if img is not None: yield f'{j:03d}-{kind}.jpg', img
        yield f'{j:03d}-{kind}.json', rec

def write_fixtures(out_dir, config: ToyWorldConfig = ToyWorldConfig()) -> list[Path]:
    "Write the files of data/toy/ into `out_dir` (see the list above)."
    out_dir = Path(out_dir)
    paths = write_shards(out_dir, 24, config, samples_per_shard=12)
    paths += write_shards(out_dir, 8, config, samples_per_shard=8, prefix='toy-dreamlip', form='dreamlip', start=24)
    paths.append(write_tar(out_dir / 'bad-samples.tar', bad_shard_members(config)))
    paths.append(save_eval_split(make_eval_split(16, config, seed=1), out_dir / 'toy-eval.npz'))
    return paths


if __name__ == '__main__':
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'data' / 'toy'
    for path in write_fixtures(out): print(path)
