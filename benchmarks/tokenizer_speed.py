"""How fast is flair_min's CLIP tokenizer (00_tokenizer)? The straightforward tokenizer against the cached one.

    python benchmarks/tokenizer_speed.py [--captions 10000] [--naive-captions 1000] [--long-word 20000]
                                         [--rounds 3] [--out results/tokenizer_speed]

Captions: `--captions` DreamLIP-length captions (60 words each, drawn from a small word list, as real captions reuse
a small vocabulary), each ending in its own 'Scene <i>.' so no two are equal. Timed in the same run, `--rounds` rounds
(a figure is the median over the rounds):

* straightforward: stages 1-5 of 00_tokenizer with no cache (clean, pre-tokenize, BPE loop every word), on the first
  `--naive-captions` captions: the baseline;
* fast, cold: `SimpleTokenizer` freshly built (empty caches), all captions in one call;
* fast, repeated: the same tokenizer on the same captions again, as in training where sentences recur;
* the two stages the fast tokenizer cannot cache: cleaning (`clean_text`) and pre-tokenizing (`pre_tokenize`).

Long word: one `--long-word`-letter string without a space (random.Random(0) letters), merged by the rescanning
loop `bpe_merge` (the baseline, timed once: it is slow) and by the heap `bpe_merge_fast` (median over the rounds);
the rank look-ups of both are counted too, a figure the same on every machine.
Writes OUT.json and OUT.md.
"""
import argparse, os, random, statistics, string, time
from pathlib import Path

import torch

from flair_min.tokenizer import (SOT, EOT, SimpleTokenizer, bpe_merge, bpe_merge_fast, build_vocab,
                                 bytes_to_unicode, clean_text, load_merges, pre_tokenize)
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
WORDS = ('the a white small red dog puppy sits on wooden floor next to green plant in pot while sunlight '
         'streams through large window behind it and shadows fall across room with blue rug cozy atmosphere '
         'background shows shelf books lamp soft warm light reflecting from glass vase flowers').split()
LABELS = {'straightforward': 'straightforward tokenizer (no cache)', 'fast, cold': 'fast tokenizer, empty caches',
          'fast, repeated': 'fast tokenizer, the same captions again', 'cleaning only': 'cleaning alone (`clean_text`)',
          'pre-tokenizing only': 'pre-tokenizing alone (`pre_tokenize`)'}


class NaiveTokenizer:
    "Stages 1-5 of 00_tokenizer with no caching: every word of every caption runs the BPE loop again."
    def __init__(self):
        merges = load_merges()
        self.byte_encoder = bytes_to_unicode()
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.encoder = {s: i for i, s in enumerate(build_vocab(merges))}

    def symbols(self, piece: str) -> list[str]:
        chars = [self.byte_encoder[b] for b in piece.encode('utf-8')]
        return chars[:-1] + [chars[-1] + '</w>']

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in pre_tokenize(clean_text(text)):
            if piece in (SOT, EOT): ids.append(self.encoder[piece]); continue
            ids += [self.encoder[s] for s in bpe_merge(self.symbols(piece), self.ranks)]
        return ids


class CountingRanks(dict):
    "A merge-rank table that counts its look-ups, as `00_tokenizer`'s check does: the work BPE does."
    def __init__(self, *args): super().__init__(*args); self.lookups = 0
    def get(self, pair, default=None): self.lookups += 1; return super().get(pair, default)
    def __contains__(self, pair): self.lookups += 1; return super().__contains__(pair)


def lookups(merge, symbols: list[str], ranks: dict) -> int:
    "Rank look-ups `merge` makes on `symbols`."
    counting = CountingRanks(ranks)
    merge(symbols, counting)
    return counting.lookups


def make_captions(n: int, seed: int = 0) -> list[str]:
    "`n` distinct captions of 60 words from `WORDS`."
    rng = random.Random(seed)
    return [' '.join(rng.choice(WORDS) for _ in range(60)) + f'. Scene {i}.' for i in range(n)]


def seconds(fn) -> float:
    tic = time.perf_counter(); fn(); return time.perf_counter() - tic


def one_round(captions: list[str], naive: NaiveTokenizer, n_naive: int) -> dict:
    "Seconds per caption of each variant in this round."
    fast = SimpleTokenizer()                                            # empty piece and text caches
    out = {'straightforward': seconds(lambda: [naive.encode(t) for t in captions[:n_naive]]) / n_naive,
           'fast, cold': seconds(lambda: fast(captions)) / len(captions),
           'fast, repeated': seconds(lambda: fast(captions)) / len(captions)}
    cleaned = [clean_text(t) for t in captions]
    out['cleaning only'] = seconds(lambda: [clean_text(t) for t in captions]) / len(captions)
    out['pre-tokenizing only'] = seconds(lambda: [pre_tokenize(t) for t in cleaned]) / len(captions)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--captions', type=int, default=10_000)
    parser.add_argument('--naive-captions', type=int, default=1_000, help='captions for the straightforward one')
    parser.add_argument('--long-word', type=int, default=20_000, help='letters of the long word')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'tokenizer_speed'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    captions, naive = make_captions(args.captions), NaiveTokenizer()
    n_naive = min(args.naive_captions, args.captions)
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(captions, naive, n_naive))
        print(f'round {r + 1}: ' + ', '.join(f'{k} {1e6 * v:.0f} us' for k, v in rounds[-1].items()), flush=True)
    per_caption = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

    rng = random.Random(0)
    word = ''.join(rng.choice(string.ascii_lowercase) for _ in range(args.long_word))
    loop = seconds(lambda: bpe_merge(naive.symbols(word), naive.ranks))
    heap = statistics.median(seconds(lambda: bpe_merge_fast(naive.symbols(word), naive.ranks))
                             for _ in range(args.rounds))
    print(f'{args.long_word}-letter word: loop {loop:.2f} s, heap {heap:.3f} s', flush=True)
    counts = {'loop': lookups(bpe_merge, naive.symbols(word), naive.ranks),
              'heap': lookups(bpe_merge_fast, naive.symbols(word), naive.ranks)}

    base = per_caption['straightforward']
    result = dict(**run_facts('tokenizer_speed.py', argv),
                  captions=args.captions, naive_captions=n_naive, words_per_caption=60, rounds=args.rounds,
                  seconds_per_caption=per_caption,
                  captions_per_second={k: 1 / v for k, v in per_caption.items()},
                  speedup_over_straightforward={k: base / per_caption[k] for k in
                                                ('straightforward', 'fast, cold', 'fast, repeated')},
                  long_word_letters=args.long_word, long_word_seconds={'loop': loop, 'heap': heap},
                  long_word_speedup=loop / heap, long_word_rank_lookups=counts, per_round=rounds)
    rows = [f'| {LABELS[k]} | {1e6 * per_caption[k]:,.0f} µs per caption | {1 / per_caption[k]:,.0f} | '
            + (f'{result["speedup_over_straightforward"][k]:.1f}× |' if k in result['speedup_over_straightforward']
               else '– |') for k in per_caption]
    rows += [f'| {args.long_word:,}-letter word, merge loop (`bpe_merge`) | {loop:.2f} s | – | 1.0× |',
             f'| {args.long_word:,}-letter word, heap (`bpe_merge_fast`) | {heap:.3f} s | – | {loop / heap:,.0f}× |']
    rows = '\n'.join(rows)
    write_results(args.out, result, 'Tokenizer speed: the straightforward tokenizer against the cached one', f"""
| what | time | captions/s | speed-up over the baseline |
|---|---|---|---|
{rows}

{args.captions:,} distinct 60-word captions ({n_naive:,} for the straightforward tokenizer), \
median of {args.rounds} round{'s' if args.rounds > 1 else ''}; the baseline is the straightforward tokenizer \
for captions and the merge loop for the long word, both timed in the same run. Rank look-ups for the long word, \
the same on every machine: {counts['loop']:,} in the loop, {counts['heap']:,} with the heap.""")


if __name__ == '__main__':
    main()
