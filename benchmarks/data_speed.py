"""Throughput of the flair_min training-data pipeline on the CPU (07_data §5).

    python benchmarks/data_speed.py [--images 64] [--loader-images 384] [--no-loader] [--out results/data_speed]

Part 1 times the pieces of one sample on one core (decode, augmentation, captions + tokenizer, the seeding of the
crop's generator), on synthetic photos of CC3M's size (512 px shortest edge, JPEG quality 90) with DreamLIP-length
sentence pools, and the whole sample at full fidelity, with draft decoding, and from images stored at 256 px; part 2
times whole DataLoader epochs of local tar shards with 0, 1 and 2 workers; part 3 the toy world (64 px images) when
data/toy exists; part 4 how fast the DreamLIP caption CSV parses. Everything is measured within one run, so the
ratios hold on a busy machine even when the absolute numbers move. Writes OUT.json and OUT.md.
"""
import argparse, csv, io, json, random, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flair_min.captions import DREAMLIP_FIELDS, sample_subcaptions
from flair_min.cc3m import DREAMLIP_URL_COLUMN, read_dreamlip_captions
from flair_min.data import make_train_loader
from flair_min.samples import make_pipeline, raw_image, raw_record, seeded, sentence_pool
from flair_min.shards import expand_urls, tar_samples, write_shard
from flair_min.model import image_transform
from flair_min.tokenizer import SimpleTokenizer
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
HUB_CSV_GB = 6.34                                   # size of DreamLIP's CC3M caption CSV on the hub (08_cc3m)
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


def per_item_ms(fn, items, repeat: int = 1) -> float:
    "Milliseconds per call of `fn` over `items` (`repeat` passes)."
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items: fn(item)
    return 1000 * (time.perf_counter() - start) / (repeat * len(items))


def piece_timings(n_images: int) -> tuple[dict, list, dict]:
    "(ms per image of each piece and of the whole sample, the raw samples, what the photos were like)."
    rng, prng = np.random.default_rng(0), random.Random(0)
    raws = [{'jpg': synthetic_photo(rng), 'json': json.dumps(dreamlip_record(prng)).encode()} for _ in range(n_images)]
    transform, tokenizer = image_transform(224, is_train=True), SimpleTokenizer()
    full = [raw_image(r) for r in raws]
    draft = [raw_image(r, 224) for r in raws]
    pools = [sentence_pool(raw_record(r)) for r in raws]
    subcaptions = [sample_subcaptions(p, 8, 3, prng) for p in pools]
    t = {'decode the JPEG, full size': per_item_ms(raw_image, raws),
         'decode the JPEG, draft mode': per_item_ms(lambda r: raw_image(r, 224), raws),
         'augment: random resized crop to 224, tensor, normalise (full-size image)': per_item_ms(transform, full),
         'augment, from the draft-decoded image': per_item_ms(transform, draft),
         'json + sentence pool': per_item_ms(lambda r: sentence_pool(raw_record(r)), raws),
         'draw K = 8 sub-captions': per_item_ms(lambda p: sample_subcaptions(p, 8, 3, prng), pools),
         'tokenize the 8 sub-captions (cold cache)': per_item_ms(tokenizer, subcaptions),
         "seed the crop's generator (fork, seed, restore)": per_item_ms(lambda _: seeded(int, 0), range(2000))}
    for draft_mode in (False, True):
        pipeline = make_pipeline(224, draft=draft_mode, tokenizer=SimpleTokenizer())
        t[f'whole sample, draft={draft_mode}'] = per_item_ms(lambda r: pipeline(r, prng), raws)
    small = [{'jpg': synthetic_photo(rng, short=256), 'json': r['json']} for r in raws]   # shards resized to 256 px
    t['whole sample, images stored at 256 px'] = per_item_ms(lambda r: pipeline(r, prng), small)
    photos = dict(images=n_images, mean_kb=float(np.mean([len(r['jpg']) for r in raws]) / 1024),
                  pool_sentences=float(np.mean([len(p) for p in pools])))
    return t, raws, photos


def loader_rates(raws: list, n_images: int, tmp: Path) -> dict:
    "Images/s of whole DataLoader epochs (batch 32, K = 8, 224 px) over 4 local shards, worker start-up included."
    samples = [{'__key__': f'{i:06d}', **raws[i % len(raws)]} for i in range(n_images)]
    for j in range(4): write_shard(tmp / f'bench-{j}.tar', samples[j::4])
    urls, rates = str(tmp / 'bench-{0..3}.tar'), {}
    for workers in (0, 1, 2):
        for draft in (False, True):
            loader = make_train_loader(urls, batch_size=32, num_workers=workers, draft=draft, seed=0, shuffle_buffer=64)
            start, n = time.perf_counter(), 0
            for images, texts in loader: n += len(images)                 # worker start-up included
            rate = rates[f'DataLoader, num_workers={workers}, draft={draft}'] = n / (time.perf_counter() - start)
            print(f'  num_workers={workers} draft={draft!s:5} {rate:7.1f} images/s')
    return rates


def toy_ms(repeat: int = 20) -> float | None:
    "ms per toy-world sample (64 px image, one caption string) through the whole pipeline at a 64 crop, one core."
    urls = sorted((ROOT / 'data/toy').glob('toy-train-*.tar'))
    if not urls: return None
    raws = [s for u in expand_urls([str(u) for u in urls]) for s in tar_samples(u)]
    pipeline, prng = make_pipeline(64, tokenizer=SimpleTokenizer()), random.Random(0)
    return per_item_ms(lambda r: pipeline(r, prng), raws, repeat)


def csv_ms_per_row(tmp: Path, n_rows: int) -> tuple[float, float]:
    "(ms per row, kB per row) of `read_dreamlip_captions` on a CSV in DreamLIP's layout, keeping every 20th row."
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
    read_dreamlip_captions(str(path), wanted, progress=False)
    return 1000 * (time.perf_counter() - start) / n_rows, path.stat().st_size / 1e3 / n_rows


def table(t: dict, loader: dict, toy: float | None, csv_row: tuple[float, float]) -> str:
    "The Markdown table: ms and rate of every measurement, and its time relative to the whole sample."
    whole = t['whole sample, draft=False']
    rows = [(name, ms, f'{ms / whole:.2f}' if ms >= 0.01 * whole else f'{ms / whole:.1e}') for name, ms in t.items()]
    rows += [(name, 1000 / rate, '—') for name, rate in loader.items()]
    if toy is not None: rows.append(('toy world: whole sample, 64 px image, 64 crop', toy, '—'))
    rows.append(('parse one row of the DreamLIP caption CSV', csv_row[0], '—'))
    lines = ['| measurement (one core; the DataLoader rows use the workers) | ms each | per second | '
             'time relative to the whole sample |', '|---|---|---|---|']
    lines += [f'| {name} | {ms:.3g} | {1000 / ms:,.0f} | {rel} |' for name, ms, rel in rows]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=64, help='synthetic CC3M-sized photos timed one by one')
    parser.add_argument('--loader-images', type=int, default=384, help='images per DataLoader run')
    parser.add_argument('--no-loader', action='store_true', help='skip the DataLoader runs')
    parser.add_argument('--csv-rows', type=int, default=20_000, help='rows of the synthetic caption CSV')
    parser.add_argument('--toy-repeat', type=int, default=20, help='passes over the toy-world samples')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'data_speed'), help='writes OUT.json and OUT.md')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t, raws, photos = piece_timings(args.images)
    for name, ms in t.items(): print(f'  {name:75} {ms:8.3f} ms')
    loader = {}
    if not args.no_loader:
        with tempfile.TemporaryDirectory() as tmp: loader = loader_rates(raws, args.loader_images, Path(tmp))
    toy = toy_ms(args.toy_repeat)
    with tempfile.TemporaryDirectory() as tmp: csv_row = csv_ms_per_row(Path(tmp), args.csv_rows)
    whole, mb_per_s = t['whole sample, draft=False'], csv_row[1] / csv_row[0]
    result = dict(**run_facts('data_speed.py', argv),
                  photos=photos, ms_per_image=t, speedup_over_full_fidelity={
                      k: whole / t[k] for k in ('whole sample, draft=True', 'whole sample, images stored at 256 px')},
                  loader_images_per_s=loader, toy_ms_per_sample=toy,
                  csv=dict(rows=args.csv_rows, ms_per_row=csv_row[0], kb_per_row=csv_row[1], mb_per_s=mb_per_s,
                           hub_csv_minutes=HUB_CSV_GB * 1e3 / mb_per_s / 60))
    write_results(args.out, result, 'Training-data pipeline on the CPU',
        f"{table(t, loader, toy, csv_row)}\n\n"
        f"CC3M rows: {photos['images']} synthetic photos of CC3M's size (mean {photos['mean_kb']:.0f} kB, 512 px "
        f"shortest edge, JPEG quality 90) with sentence pools of {photos['pool_sentences']:.0f} sentences, 224-pixel "
        f"crops, K = 8. The caption CSV parses at {result['csv']['mb_per_s']:.0f} MB/s, so the "
        f"{HUB_CSV_GB} GB hub file takes about {result['csv']['hub_csv_minutes']:.1f} minutes.")


if __name__ == '__main__':
    main()
