"""Throughput of the flair_min training-data pipeline on this machine's CPU.

    python benchmarks/data_speed.py [--images 64] [--loader-images 384] [--no-loader]

Part 1 times the pieces of one sample on one core (decode, augmentation, captions + tokenizer),
on synthetic photos of CC3M's size (512 px shortest edge, JPEG quality 90) with DreamLIP-length
sentence pools; part 2 times whole DataLoaders of local tar shards with 0, 1 and 2 workers;
part 3 the toy world (64 px images) when data/toy exists. Everything is measured within one run,
so the ratios hold on a shared machine even when the absolute numbers move.
"""
import argparse, csv, io, json, random, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flair_min.data import make_pipeline, make_train_loader, raw_image, raw_record, sentence_pool, write_shard
from flair_min.cc3m import DREAMLIP_URL_COLUMN, read_dreamlip_captions
from flair_min.captions import DREAMLIP_FIELDS, sample_subcaptions
from flair_min.model import image_transform
from flair_min.tokenizer import SimpleTokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ('the a an of in on with and near behind above below beside its their this that while large small tall short '
         'red blue green yellow white black brown gray orange pink wooden metal glass stone old new bright dark soft '
         'man woman child dog cat bird horse car bus bicycle tree flower house building street road river sky cloud '
         'table chair window door wall floor roof shelf book lamp cup plate bottle bag hat shirt jacket dress shoe '
         'stands sits walks holds looks runs lies hangs rests leans appears shows features captures surrounded '
         'background foreground center left right corner scene image photo view light shadow sunlight water grass '
         'field mountain beach city park garden room kitchen market crowd group people family friends').split()


def synthetic_photo(rng: np.random.Generator, short: int = 512, quality: int = 90) -> bytes:
    "A photo-like JPEG: smooth colour regions plus fine texture, shortest edge `short`, aspect 1 to 1.5."
    long = int(short * rng.uniform(1.0, 1.5))
    w, h = (long, short) if rng.random() < 0.7 else (short, long)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 9, (h, w, 3))       # texture: what makes JPEGs big
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, 'JPEG', quality=quality)
    return out.getvalue()


def sentence(rng: random.Random, n_words: int) -> str:
    return ' '.join(rng.choice(WORDS) for _ in range(n_words)).capitalize()


def dreamlip_record(rng: random.Random) -> dict:
    "Seven fields like DreamLIP's: a raw caption, three one-sentence short captions, three long ones (5-9 sentences)."
    record = {'raw_caption': [sentence(rng, 9)]}
    for field in DREAMLIP_FIELDS[1:]:
        n = 1 if field.startswith('short') else rng.randint(5, 9)
        record[field] = [sentence(rng, rng.randint(8, 20)) for _ in range(n)]
    return record


def per_image_ms(fn, items, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items: fn(item)
    return 1000 * (time.perf_counter() - start) / (repeat * len(items))


def piece_timings(n_images: int) -> dict:
    rng, prng = np.random.default_rng(0), random.Random(0)
    raws = [{'jpg': synthetic_photo(rng), 'json': json.dumps(dreamlip_record(prng)).encode()} for _ in range(n_images)]
    kb = np.mean([len(r['jpg']) for r in raws]) / 1024
    pool_len = np.mean([len(sentence_pool(raw_record(r))) for r in raws])
    transform, tokenizer = image_transform(224, is_train=True), SimpleTokenizer()
    full = [raw_image(r) for r in raws]
    draft = [raw_image(r, 224) for r in raws]
    pools = [sentence_pool(raw_record(r)) for r in raws]
    subcaptions = [sample_subcaptions(p, 8, 3, prng) for p in pools]
    t = {'decode full': per_image_ms(raw_image, raws),
         'decode draft': per_image_ms(lambda r: raw_image(r, 224), raws),
         'augment (from full)': per_image_ms(transform, full),
         'augment (from draft)': per_image_ms(transform, draft),
         'json + pool': per_image_ms(lambda r: sentence_pool(raw_record(r)), raws),
         'sample K=8': per_image_ms(lambda p: sample_subcaptions(p, 8, 3, prng), pools),
         'tokenize K=8 (cold)': per_image_ms(tokenizer, subcaptions)}
    for draft_mode in (False, True):
        pipeline = make_pipeline(224, draft=draft_mode, tokenizer=SimpleTokenizer())
        t[f'whole sample, draft={draft_mode}'] = per_image_ms(lambda r: pipeline(r, prng), raws)
    small = [{'jpg': synthetic_photo(rng, short=256), 'json': r['json']} for r in raws]   # shards resized to 256 px
    t['whole sample, 256 px on disk'] = per_image_ms(lambda r: pipeline(r, prng), small)
    print(f'{n_images} synthetic photos, mean {kb:.0f} kB, {full[0].size[0]}x{full[0].size[1]} (first); '
          f'sentence pools of {pool_len:.0f} sentences; one core (torch threads = 1)')
    for name, ms in t.items(): print(f'  {name:28} {ms:7.2f} ms/image')
    return t, raws


def loader_rates(raws: list, n_images: int, tmp: Path) -> None:
    samples = [{'__key__': f'{i:06d}', **raws[i % len(raws)]} for i in range(n_images)]
    for j in range(4): write_shard(tmp / f'bench-{j}.tar', samples[j::4])
    urls = str(tmp / 'bench-{0..3}.tar')
    print(f'DataLoader, {n_images} images in 4 local shards, batch 32, K=8, 224 px '
          '(images/s after the first batch; the process count includes the main one):')
    for workers in (0, 1, 2):
        for draft in (False, True):
            loader = make_train_loader(urls, batch_size=32, num_workers=workers, draft=draft, seed=0, shuffle_buffer=64)
            batches = iter(loader); next(batches)
            start, n = time.perf_counter(), 0
            for images, texts in batches: n += len(images)
            print(f'  num_workers={workers} draft={str(draft):5} {n / (time.perf_counter() - start):7.1f} images/s')


def toy_rates(repeat: int = 20) -> None:
    "The toy world's shards (64 px images, one caption string each): the pieces and the whole sample, per core."
    from flair_min.data import tar_samples, expand_urls
    raws = [s for u in expand_urls(str(ROOT / 'data/toy/toy-train-*.tar')) for s in tar_samples(u)]
    prng, tokenizer = random.Random(0), SimpleTokenizer()
    images, pools = [raw_image(r) for r in raws], [sentence_pool(raw_record(r)) for r in raws]
    decode = per_image_ms(raw_image, raws, repeat)
    captions = per_image_ms(lambda p: tokenizer(sample_subcaptions(p, 8, 3, prng)), pools, repeat)
    print(f'toy world, {len(raws)} samples of 64 px, '
          f'pools of {np.mean([len(p) for p in pools]):.0f} sentences, one core:')
    for size in (64, 32):
        augment = per_image_ms(image_transform(size, is_train=True), images, repeat)
        pipeline = make_pipeline(size, tokenizer=SimpleTokenizer())
        whole = per_image_ms(lambda r: pipeline(r, prng), raws, repeat)
        print(f'  crop {size}: decode {decode:.2f} + augment {augment:.2f} + captions/tokens {captions:.2f} ms; '
              f'whole sample {whole:.2f} ms/image = {1000 / whole:.0f} images/s per core')


def csv_rate(tmp: Path, n_rows: int = 20_000) -> None:
    "How fast `read_dreamlip_captions` parses a CSV in DreamLIP's layout (the hub CSV is 6.34 GB)."
    prng = random.Random(0)
    path = tmp / 'captions.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([DREAMLIP_URL_COLUMN, *DREAMLIP_FIELDS])
        for i in range(n_rows):
            record = dreamlip_record(prng)
            writer.writerow([f'https://example.com/{i}.jpg', *('. '.join(record[k]) + '.' for k in DREAMLIP_FIELDS)])
    wanted = {f'https://example.com/{i}.jpg' for i in range(0, n_rows, 20)} | {'https://example.com/missing.jpg'}
    start = time.perf_counter()
    found = read_dreamlip_captions(str(path), wanted, progress=False)
    seconds = time.perf_counter() - start
    mb = path.stat().st_size / 1e6
    print(f'caption CSV: {n_rows:,} rows ({mb:.0f} MB, {1e3 * mb / n_rows:.1f} kB a row), {len(found):,} kept: '
          f'{n_rows / seconds:,.0f} rows/s = {mb / seconds:.0f} MB/s '
          f'-> the 6.34 GB hub CSV in about {6340 / (mb / seconds) / 60:.1f} min')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--loader-images', type=int, default=384)
    parser.add_argument('--no-loader', action='store_true')
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, raws = piece_timings(args.images)
    if not args.no_loader:
        with tempfile.TemporaryDirectory() as tmp: loader_rates(raws, args.loader_images, Path(tmp))
    if any((ROOT / 'data/toy').glob('toy-train-*.tar')): toy_rates()
    with tempfile.TemporaryDirectory() as tmp: csv_rate(Path(tmp))


if __name__ == '__main__':
    main()
