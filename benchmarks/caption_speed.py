"""The text side of one training image (01_captions §6): sampling K sub-captions, then tokenizing them.

    python benchmarks/caption_speed.py [--images 200] [--k 8] [--rounds 5] [--out results/caption_speed]

Pools: each image's sentence pool is the sentences of three long captions of the Urban-1k excerpt
(data/annotations/urban1k_annotations_excerpt.json, real long descriptions, `split_caption`), about as many as a
DreamLIP record holds, each sentence tagged with the image's number so no two images share a sentence (as in a
real dataset, where the tokenizer's text cache rarely sees a sentence twice). Per image, K sub-captions with
`max_merged` 3, in two steps timed in the same run:

* sampling: `sample_subcaptions` on the image's pool (K joined strings);
* tokenizing: the tokenizer on those K strings (a (K, 77) tensor of token ids).

A warm-up round fills the tokenizer's per-word cache, then `--rounds` rounds, each on fresh pools (new image
numbers); a figure is the median over the rounds. Writes OUT.json and OUT.md.
"""
import argparse, json, os, statistics, time
from pathlib import Path

import torch

from flair_min.captions import sample_subcaptions, split_caption
from flair_min.tokenizer import SimpleTokenizer
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / 'data' / 'annotations' / 'urban1k_annotations_excerpt.json'
LABELS = {'sample': 'sample K sub-captions: `sample_subcaptions`',
          'tokenize': 'tokenize them: `SimpleTokenizer` on the K strings',
          'both': 'both: the text side of one image'}


def make_pools(images: int, first: int) -> list[list[str]]:
    "Sentence pools of `images` images numbered from `first`: three Urban-1k captions each, sentences tagged."
    captions = [a['caption'] for a in json.loads(CAPTIONS.read_text())['annotations']]
    return [[f'{s} in view {j}' for i in range(3) for s in split_caption(captions[(j + i) % len(captions)])]
            for j in range(first, first + images)]


def seconds(fn) -> float:
    tic = time.perf_counter(); fn(); return time.perf_counter() - tic


def one_round(pools, tok: SimpleTokenizer, k: int, max_merged: int) -> dict:
    "Seconds per image of each step, on these pools."
    n, drawn = len(pools), []
    out = {'sample': seconds(lambda: drawn.extend(sample_subcaptions(p, k, max_merged, rng=j)
                                                  for j, p in enumerate(pools))) / n}
    out['tokenize'] = seconds(lambda: [tok(texts) for texts in drawn]) / n
    out['both'] = out['sample'] + out['tokenize']
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--k', type=int, default=8, help='sub-captions per image')
    parser.add_argument('--max-merged', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'caption_speed'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    tok = SimpleTokenizer()
    one_round(make_pools(args.images, 0), tok, args.k, args.max_merged)               # warm-up: the word cache
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(make_pools(args.images, (r + 1) * args.images), tok, args.k, args.max_merged))
        print(f'round {r + 1}: ' + ', '.join(f'{w} {1e6 * v:.0f} us' for w, v in rounds[-1].items()), flush=True)
    per_image = {w: statistics.median(r[w] for r in rounds) for w in LABELS}
    pools = make_pools(args.images, 0)
    result = dict(**run_facts('caption_speed.py', argv), images=args.images, k=args.k,
                  max_merged=args.max_merged, rounds=args.rounds,
                  sentences_per_pool_mean=sum(map(len, pools)) / len(pools),
                  seconds_per_image=per_image, share_of_both={w: per_image[w] / per_image['both'] for w in LABELS},
                  per_round=rounds)
    rows = '\n'.join(f'| {LABELS[w]} | {1e6 * per_image[w]:,.0f} | {100 * result["share_of_both"][w]:.0f} % |'
                     for w in LABELS)
    write_results(args.out, result, 'Sub-captions of one image: time per image', f"""
| step | µs per image | share |
|---|---|---|
{rows}

{args.images} images per round, $K = {args.k}$ sub-captions each from pools of \
{result['sentences_per_pool_mean']:.1f} sentences on average (three Urban-1k captions per image), median of \
{args.rounds} round{'s' if args.rounds > 1 else ''}, both steps timed in the same run.""")


if __name__ == '__main__':
    main()
