"""Sentence splitting parity, record pools, and diverse sampling: the rng call sequence, statistical checks
that a wrong sampler fails (shown on deliberately wrong samplers)."""
import random
from collections import Counter
from itertools import permutations, product
from math import comb, sqrt

import pytest
from scipy import stats

from flair_min.captions import (DREAMLIP_FIELDS, caption_pool, is_blank_sentence, make_rng, sample_subcaption_indices,
                                sample_subcaptions, split_caption)

P_REJECT = 1e-4   # a chi-square p-value below this rejects the sampler
Z_REJECT = 4.5    # a binomial z-score above this rejects the sampler


# ---------------------------------------------------------------- splitting

def test_split_caption_parity(text_vectors):
    assert len(text_vectors['captions']) == 7
    for caption, sentences in zip(text_vectors['captions'], text_vectors['split_caption']):
        assert split_caption(caption) == sentences, caption


@pytest.mark.parametrize('text, expected', [
    ('a. b', ['a', 'b']), ('3.5 m', ['3', '5 m']), ('x...y', ['x', 'y']), ('a</s>b\nc', ['a', 'b', 'c']),
    ('  pad  .  ', ['pad']), ('\n\n', []), ('</s/>', ['</s/>']), ('a\r\nb', ['a', 'b']),
    ('tab\tinside', ['tab\tinside'])])
def test_split_caption_cases(text, expected):
    assert split_caption(text) == expected


def test_split_caption_rejects_non_strings():
    with pytest.raises(TypeError, match='caption string'): split_caption(None)


# ---------------------------------------------------------------- record pools

def test_pool_dreamlip_order_and_missing_fields():
    record = {f: [f'{f}-{i}' for i in range(2)] for f in reversed(DREAMLIP_FIELDS)}  # dict order is not used
    assert caption_pool(record) == [f'{f}-{i}' for f in DREAMLIP_FIELDS for i in range(2)]
    del record['shortIB_captions'], record['longLLA_captions']
    assert caption_pool(record) == [f'{f}-{i}' for f in DREAMLIP_FIELDS[:1] + DREAMLIP_FIELDS[2:6] for i in range(2)]


def test_pool_strings_lists_and_pixelprose():
    assert (caption_pool({'longSV_captions': 'One. Two\nThree', 'raw_caption': ('alt',)})
            == ['alt', 'One', 'Two', 'Three'])
    assert caption_pool({'raw_caption': [' kept as is ', '']}) == [' kept as is ']   # not stripped; blanks dropped
    assert caption_pool({'caption': 'A cat. 2.5 cats</s>Sleeps', 'url': 'x'}) == ['A cat', '2', '5 cats', 'Sleeps']
    assert caption_pool({'raw_caption': ['dreamlip wins'], 'caption': 'ignored'}) == ['dreamlip wins']


@pytest.mark.parametrize('record, message', [
    (['a list'], 'record is a list; expected a dict'),
    ('a string', 'record is a str'),
    ({}, 'no caption field'),
    ({'text': 'hello', 'url': 'x'}, "its keys: ['text', 'url']"),
    ({'caption': ['a', 'b']}, "'caption' holds a list; expected a string"),
    ({'caption': None}, "'caption' holds a NoneType"),
    ({'raw_caption': 3}, "'raw_caption' holds a int; expected a list of sentences or a string"),
    ({'raw_caption': ['ok'], 'longIB_captions': ['fine', b'bytes']}, "'longIB_captions', sentence 1, is a bytes"),
    ({'raw_caption': [], 'shortSV_captions': ' . '}, 'no non-blank sentence'),
    ({'caption': ''}, "['caption'] hold no non-blank sentence"),
    ({'raw_caption': ['  ', '']}, 'no non-blank sentence'),
    ({'raw_caption': ['...', ' ']}, "['raw_caption'] hold no non-blank sentence (only whitespace and punctuation)"),
    ({'raw_caption': ['?!', '\n'], 'longSV_captions': ' . ', 'longLLA_captions': ('—', '')}, 'no non-blank sentence'),
    ({'caption': '!!. ?'}, 'no non-blank sentence'),
])
def test_pool_errors_name_the_problem(record, message):
    with pytest.raises(ValueError) as err: caption_pool(record)
    assert message in str(err.value), str(err.value)


def test_blank_sentences_are_dropped_from_lists_as_from_strings():
    "A list entry of only whitespace and punctuation is dropped, as split_caption drops the empty pieces of a string."
    assert all(map(is_blank_sentence, ['', ' ...\t', '?!—', '\x00']))
    assert not any(map(is_blank_sentence, ['a', ' 3 ', '🐶', '...a']))
    record = {'raw_caption': ['...', ' ', 'A cat'], 'longIB_captions': ['?!'], 'longSV_captions': 'It sleeps. ?! .'}
    assert caption_pool(record) == ['A cat', 'It sleeps']
    assert caption_pool({'raw_caption': ['...', ' '], 'longIB_captions': 'A dog'}) == ['A dog']
    assert caption_pool({'raw_caption': [' a ', ' (b) ']}) == [' a ', ' (b) ']   # sentences with text stay as they are


# ---------------------------------------------------------------- the rng contract

def replay(n, k, max_merged, rng):
    "The documented call sequence, replayed call by call on a random.Random."
    out = []
    for _ in range(k):
        s = rng.randint(1, max_merged)
        if s == 1: out.append((rng.choice(range(n)),)); continue
        if rng.random() < 0.5:
            if s >= n: out.append(tuple(range(n)))
            else:
                i = rng.sample(range(n - s), 1)[0]; out.append(tuple(range(i, i + s)))
        elif s <= n: out.append(tuple(rng.sample(range(n), s)))
        else: out.append(tuple(rng.choice(range(n)) for _ in range(s)))
    return out


@pytest.mark.parametrize('n', [1, 2, 3, 7, 30])
@pytest.mark.parametrize('max_merged', [1, 3, 5])
def test_rng_call_sequence_is_the_documented_one(n, max_merged):
    for seed in range(40):
        ours, theirs = random.Random(seed), random.Random(seed)
        assert sample_subcaption_indices(n, 8, max_merged, ours) == replay(n, 8, max_merged, theirs)
        assert ours.getstate() == theirs.getstate()   # same calls, same count: the stream continues identically


def test_seeds_and_rngs():
    pool = [f'w{i}' for i in range(20)]
    assert sample_subcaptions(pool, 8, rng=3) == sample_subcaptions(pool, 8, rng=random.Random(3))
    assert sample_subcaptions(pool, 8, rng=3) != sample_subcaptions(pool, 8, rng=4)
    assert sample_subcaptions(pool, 8) != sample_subcaptions(pool, 8)   # None: fresh entropy (equal w.p. ~1e-20)
    r = random.Random(5); first = sample_subcaptions(pool, 8, rng=r)
    assert sample_subcaptions(pool, 8, rng=r) != first                  # a passed Random advances
    with pytest.raises(TypeError, match='random.Random'): make_rng('5')
    with pytest.raises(TypeError, match='random.Random'): make_rng(True)


def test_strings_are_the_joined_indices():
    pool = [f'sentence {i}' for i in range(6)]
    for seed in range(50):
        idx = sample_subcaption_indices(6, 8, 4, random.Random(seed))
        assert sample_subcaptions(pool, 8, 4, random.Random(seed)) == ['. '.join(pool[i] for i in t) for t in idx]


@pytest.mark.parametrize('call, error, message', [
    (lambda: sample_subcaptions([], 8), ValueError, 'empty'),
    (lambda: sample_subcaptions('a. b', 8), TypeError, 'list of strings'),
    (lambda: sample_subcaptions(['a', 1], 8), TypeError, r'sentences\[1\] is a int'),
    (lambda: sample_subcaptions(['a'], 0), ValueError, 'k=0'),
    (lambda: sample_subcaptions(['a'], 2.0), ValueError, 'k=2.0'),
    (lambda: sample_subcaptions(['a'], 2, max_merged=0), ValueError, 'max_merged=0'),
])
def test_sampling_errors(call, error, message):
    with pytest.raises(error, match=message): call()


# ---------------------------------------------------------------- statistical checks
# Each check takes a string-level sampler(sentences, k, max_merged, rng) -> list[str] and returns True when
# the sampler's output is consistent with the sampling rule of `01_captions` §2.
# Seeds are fixed, so every outcome is deterministic.

def draw(sampler, n, k, max_merged=3, rng=0):
    "Sub-captions from a pool of distinct sentences 'w0'.., decoded back to index tuples."
    pool = [f'w{i}' for i in range(n)]
    return [tuple(int(w[1:]) for w in sub.split('. ')) for sub in sampler(pool, k, max_merged, rng)]


class AlwaysConsecutive(random.Random):
    "A seeded Random whose coin (rng.random()) always says consecutive; integer draws stay random."
    def random(self): return 0.0
    def getrandbits(self, k): return super().getrandbits(k)


def chi2_ok(counts: dict, probs: dict) -> bool:
    if set(counts) - set(probs): return False                         # an impossible outcome
    keys = sorted(probs); total = sum(counts.values())
    return stats.chisquare([counts.get(t, 0) for t in keys], [probs[t] * total for t in keys]).pvalue > P_REJECT


def z_ok(hits: int, trials: int, p: float) -> bool:
    return trials > 0 and abs(hits - trials * p) / sqrt(trials * p * (1 - p)) < Z_REJECT


def merge_counts_ok(sampler) -> bool:
    "The number of sentences per sub-caption is uniform over {1..max_merged} (pool larger than max_merged)."
    return all(chi2_ok(Counter(map(len, draw(sampler, 20, 15_000, m, rng=m))), {s: 1 / m for s in range(1, m + 1)})
               for m in (3, 5))


def consecutive_starts_ok(sampler) -> bool:
    "With the coin forced to consecutive: runs only, start uniform over {0..n-s-1}, never n-s."
    n, subs = 10, draw(sampler, 10, 15_000, rng=AlwaysConsecutive(1))
    for s in (2, 3):
        runs = [t for t in subs if len(t) == s]
        if any(t != tuple(range(t[0], t[0] + s)) for t in runs): return False
        starts = Counter(t[0] for t in runs)
        if starts[n - s] or not chi2_ok(starts, {i: 1 / (n - s) for i in range(n - s)}): return False
    return True


def coin_ok(sampler) -> bool:
    "About half of the multi-sentence draws are consecutive: P(ascending run | s) = 1/2 + 1/2 * (#runs / #ordered)."
    n, subs = 20, draw(sampler, 20, 15_000, rng=2)
    for s in (2, 3):
        ordered = [t for t in subs if len(t) == s]
        hits = sum(t == tuple(range(t[0], t[0] + s)) for t in ordered)
        p_random_run = (n - s + 1) / (comb(n, s) * len(list(permutations(range(s)))))
        if not z_ok(hits, len(ordered), 0.5 + 0.5 * p_random_run): return False
    return True


def no_repeats_when_it_fits_ok(sampler) -> bool:
    "With s <= n, no sub-caption uses a sentence twice (consecutive runs and random draws alike)."
    return all(len(set(t)) == len(t) for n in (3, 20) for t in draw(sampler, n, 5_000, rng=n))


def distinct_law(n, s):
    "Law of the number of distinct indices among s independent uniform draws from n."
    return {d: c / n ** s for d, c in Counter(len(set(t)) for t in product(range(n), repeat=s)).items()}


def replacement_ok(sampler) -> bool:
    "With s > n (n=4, s in {5, 6}): random draws appear as often as they should and repeat like independent draws."
    n, m, subs = 4, 6, draw(sampler, 4, 12_000, 6, rng=3)
    for s in (5, 6):
        long = [t for t in subs if len(t) == s]
        if not z_ok(len(long), len(subs), 1 / (2 * m)): return False
        if not chi2_ok(Counter(len(set(t)) for t in long), distinct_law(n, s)): return False
    return True


def exact_law(n, m):
    "Probability of every index tuple of one sub-caption, enumerated from the sampling rule (01_captions §2)."
    law = Counter()
    for s in range(1, m + 1):
        if s == 1:
            for i in range(n): law[(i,)] += 1 / (m * n)
            continue
        runs = [tuple(range(n))] if s >= n else [tuple(range(i, i + s)) for i in range(n - s)]
        picks = list(permutations(range(n), s)) if s <= n else list(product(range(n), repeat=s))
        for t in runs: law[t] += 1 / (2 * m * len(runs))
        for t in picks: law[t] += 1 / (2 * m * len(picks))
    return law


def full_law_ok(sampler) -> bool:
    "Pearson chi-square of one sub-caption's index tuple against its exact law, for small pools."
    return all(chi2_ok(Counter(draw(sampler, n, 30_000, 3, rng=n)), exact_law(n, 3)) for n in (2, 4))


CHECKS = [merge_counts_ok, consecutive_starts_ok, coin_ok, no_repeats_when_it_fits_ok, replacement_ok, full_law_ok]


def test_exact_law_sums_to_one():
    for n in (1, 2, 4, 6):
        assert abs(sum(exact_law(n, 3).values()) - 1) < 1e-12


@pytest.mark.parametrize('check', CHECKS, ids=lambda c: c.__name__)
def test_sample_subcaptions_passes(check):
    assert check(sample_subcaptions)


# ------------------------------------------ deliberately wrong samplers: the checks must reject them

def make_sampler(bug=None):
    "A string-level diverse sampler written from the sampling rule (01_captions §2), with at most one deliberate bug."
    def sampler(sentences, k, max_merged=3, rng=None):
        rng, n, out = make_rng(rng), len(sentences), []
        for _ in range(k):
            s = rng.randint(1, max_merged) if bug != 'merge_count' else min(rng.randint(1, max_merged + 1), max_merged)
            coin = rng.random()                                  # drawn even when unused: a different stream
            if s == 1: idx = [rng.randrange(n)]
            elif bug == 'always_consecutive' or coin < (0.6 if bug == 'biased_coin' else 0.5):
                if s >= n: idx = list(range(n))
                else:
                    start = rng.randint(0, n - s) if bug == 'off_by_one' else rng.randrange(n - s)
                    idx = list(range(start, start + s))
            elif bug == 'always_replacement': idx = [rng.randrange(n) for _ in range(s)]
            elif s <= n: idx = rng.sample(range(n), s)
            elif bug == 'no_replacement': idx = rng.sample(range(n), n)                      # caps at the pool
            elif bug == 'fill_pool_first': idx = rng.sample(range(n), n) + [rng.randrange(n) for _ in range(s - n)]
            else: idx = [rng.randrange(n) for _ in range(s)]
            out.append('. '.join(sentences[i] for i in idx))
        return out
    return sampler


def test_independent_correct_sampler_passes_everything():
    "A correct sampler with a different random stream (a coin drawn every time) passes: the checks test the law."
    assert all(check(make_sampler()) for check in CHECKS)


@pytest.mark.parametrize('bug, rejected_by', [
    ('off_by_one', [consecutive_starts_ok, full_law_ok]),
    ('always_consecutive', [coin_ok, full_law_ok]),
    ('biased_coin', [coin_ok, full_law_ok]),
    ('no_replacement', [replacement_ok, full_law_ok]),
    ('fill_pool_first', [replacement_ok, full_law_ok]),
    ('always_replacement', [no_repeats_when_it_fits_ok, full_law_ok]),
    ('merge_count', [merge_counts_ok, full_law_ok]),
])
def test_checks_reject_wrong_samplers(bug, rejected_by):
    wrong = make_sampler(bug)
    for check in rejected_by:
        assert not check(wrong), f'{check.__name__} accepted the {bug!r} sampler'
