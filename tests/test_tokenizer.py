"""Tokenizer parity with the official CLIP tokenizer, and properties over many generated strings."""
import pickle, random, re, string
import pytest, torch
from hypothesis import given, settings, strategies as st

from flair_min.tokenizer import (SimpleTokenizer, bpe_merge, bpe_merge_fast, bytes_to_unicode, clean_text,
                                 get_tokenizer, load_merges, pre_tokenize)

SOT, EOT = 49406, 49407


@pytest.fixture(scope='module')
def tok(): return get_tokenizer()


@pytest.mark.parametrize('ctx', [77, 32])
def test_parity_with_official_ids(text_vectors, ctx):
    ids = get_tokenizer(context_length=ctx)(text_vectors['strings'])
    assert torch.equal(ids, text_vectors[f'tokens_ctx{ctx}'])


def test_parity_one_string_at_a_time(text_vectors, tok):
    for s, ref in zip(text_vectors['strings'], text_vectors['tokens_ctx77']):
        assert torch.equal(tok(s)[0], ref), s


def naive_encode(text, ranks, encoder, byte_encoder):
    "Uncached reference: the stages of the notebook, one after another."
    ids = []
    for piece in pre_tokenize(clean_text(text)):
        if piece in ('<start_of_text>', '<end_of_text>'): ids.append(encoder[piece]); continue
        chars = [byte_encoder[b] for b in piece.encode('utf-8')]
        ids += [encoder[s] for s in bpe_merge(chars[:-1] + [chars[-1] + '</w>'], ranks)]
    return ids


@pytest.fixture(scope='module')
def naive_parts(tok):
    return {pair: i for i, pair in enumerate(load_merges())}, tok.encoder, tok.byte_encoder


texts = st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=80)
wordy = st.lists(st.sampled_from(['The', 'puppy', "isn't", 'red.', '4.5', '?.', '"quoted".', 'café', '🐶',
                                  '&amp;', '日本', 'a', '\n', '  ', 'ladybug', '(x),', 'x'*30]),
                 max_size=40).map(' '.join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(texts, wordy))
def test_fast_equals_naive(tok, naive_parts, text):
    assert list(tok._encode(text)) == naive_encode(text, *naive_parts)  # cached pieces vs. merging afresh


@settings(max_examples=300, deadline=None)
@given(st.one_of(texts, wordy), st.integers(2, 80))
def test_layout_sot_eot_padding_truncation(tok, text, ctx):
    row = tok(text, context_length=ctx)[0].tolist()
    body = list(tok.encode(text))
    assert len(row) == ctx and row[0] == SOT
    if len(body) + 2 <= ctx:
        assert row[1:len(body) + 1] == body and row[len(body) + 1] == EOT
        assert all(i == 0 for i in row[len(body) + 2:])
    else:  # cut to ctx, last kept position set to EOT
        assert row[1:-1] == body[:ctx - 2] and row[-1] == EOT
    assert max(row) == EOT or '<end_of_text>' in clean_text(text)  # pooling (argmax) finds an EOT


@settings(max_examples=300, deadline=None)
@given(st.one_of(texts, wordy))
def test_decode_round_trip_up_to_spaces(tok, text):
    clean = clean_text(text)
    if '<start_of_text>' in clean or '<end_of_text>' in clean: return
    ids = tok(text, context_length=1000)[0]
    assert tok.decode(ids).replace(' ', '') == clean.replace(' ', '')


def test_seeded_random_captions_round_trip(tok):
    rng = random.Random(0)
    for _ in range(500):
        words = [''.join(rng.choice(string.ascii_letters + "'.,!?0123456789") for _ in range(rng.randint(1, 12)))
                 for _ in range(rng.randint(0, 30))]
        text = ' '.join(words)
        assert tok.decode(tok(text, context_length=400)[0]).replace(' ', '') == clean_text(text).replace(' ', '')


def test_byte_table_is_a_bijection_in_clip_order():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert list(table.values())[:3] == ['!', '"', '#'] and table[ord(' ')] == 'Ġ'


def test_batch_shapes_and_errors(tok):
    assert tok([]).shape == (0, 77)
    assert tok(['a', 'b c']).dtype == torch.long
    with pytest.raises(ValueError, match='context_length'): tok('a', context_length=1)
    with pytest.raises(TypeError, match='list of strings'): tok(['a', None])
    with pytest.raises(ValueError, match='model_name'): get_tokenizer('RN50-NOPE')
    with pytest.raises(ValueError, match='model_name'): get_tokenizer('RN50-NOPE', context_length=32)


@pytest.mark.parametrize('bad', [0, 1, -5, 2.5, True, '77'])
def test_context_length_below_two_or_not_an_int_is_rejected(tok, bad):
    message = f'context_length={bad!r}: expected an int >= 2'
    with pytest.raises(ValueError, match=re.escape(message)): tok('a dog', context_length=bad)
    with pytest.raises(ValueError, match=re.escape(message)): get_tokenizer(context_length=bad)
    with pytest.raises(ValueError, match=re.escape(message)): SimpleTokenizer(context_length=bad)
    assert tok('a dog', context_length=2).tolist() == [[SOT, EOT]]


def test_every_model_preset_has_a_tokenizer():
    from flair_min.model import FlairConfig, list_models
    assert list_models()
    for name in list_models():
        n = FlairConfig.resolve(name).context_length
        assert get_tokenizer(name).context_length == n and get_tokenizer(name)('a dog').shape == (1, n), name
    assert get_tokenizer('tiny')('a dog').shape == (1, 16)


class CountingRanks(dict):
    "A merge-rank table that counts its look-ups: the work BPE does, independent of machine load."
    def __init__(self, *args): super().__init__(*args); self.lookups = 0
    def get(self, pair, default=None): self.lookups += 1; return super().get(pair, default)
    def __contains__(self, pair): self.lookups += 1; return super().__contains__(pair)


def symbols(piece, byte_encoder):
    chars = [byte_encoder[b] for b in piece.encode('utf-8')]
    return chars[:-1] + [chars[-1] + '</w>']


# ids of a 20,000-letter word (random.Random(0) letters), computed with the rescanning merge loop (bpe_merge)
LONG_WORD_IDS = [1152, 77, 717, 80, 13699, 89, 73, 712, 9599, 80, 68, 1013, 29896, 7710, 582, 86, 89, 600, 18289, 87,
                 13531, 74, 766, 12558, 22708, 764, 709, 628, 80, 3962, 89, 1773, 87, 16725, 89, 8664, 38105, 2166, 87,
                 74, 4842, 70, 552, 71, 2254, 89, 3268, 916, 80, 79, 3761, 26016, 86, 1084, 7309, 45937, 635, 42012,
                 3381, 89, 11581, 552, 31130, 28953, 3317, 45714, 2976, 85, 18114, 3116, 1189, 16204, 45195, 15554,
                 33389]


def test_a_20000_letter_word_is_fast_and_unchanged(tok):
    rng = random.Random(0)
    word = ''.join(rng.choice(string.ascii_lowercase) for _ in range(20_000))
    clone = pickle.loads(pickle.dumps(tok))
    clone.ranks = CountingRanks(clone.ranks)
    assert clone(word)[0].tolist() == [SOT, *LONG_WORD_IDS, EOT]
    assert clone.ranks.lookups < 6 * len(word)            # linear; the rescanning loop needed ~10,000 x as many
    assert clone(word, context_length=16)[0].tolist() == [SOT, *LONG_WORD_IDS[:14], EOT]
    assert word not in clone.piece_cache                  # junk is not kept in the piece cache


def test_a_caption_of_long_words_stops_once_the_context_is_full(tok, naive_parts):
    rng = random.Random(1)
    words = [''.join(rng.choice(string.ascii_lowercase) for _ in range(1000)) for _ in range(40)]
    clone, merged = pickle.loads(pickle.dumps(tok)), []
    piece_ids = clone.piece_ids
    clone.piece_ids = lambda piece: merged.append(piece) or piece_ids(piece)
    row = clone(' '.join(words))[0].tolist()
    assert merged == words[:1]                             # only the first word is merged: it fills the context
    assert row == [SOT, *naive_encode(words[0], *naive_parts)[:75], EOT]
    short = ' '.join(words[0][:40 + i] for i in range(6))  # many medium words: stop after the context is full
    merged.clear()
    assert clone(short, context_length=16)[0].tolist()[1:-1] == naive_encode(short, *naive_parts)[:14]
    assert len(merged) < 6


pieces = st.text(alphabet=st.sampled_from(list('abcdefghijklmnopqrstuvwxyz') + list('éü日.,!?')), min_size=1,
                 max_size=60)


@settings(max_examples=500, deadline=None)
@given(pieces)
def test_heap_bpe_equals_the_loop(tok, piece):
    merged = bpe_merge(symbols(piece, tok.byte_encoder), tok.ranks)
    assert bpe_merge_fast(symbols(piece, tok.byte_encoder), tok.ranks) == merged


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(['a red ladybug']), tok(['a red ladybug']))


def test_junction_piece_merges(tok):
    # '?.' is one regex piece that BPE merges into one token (00_tokenizer §4; 01_captions §2 joins sentences with ". ")
    assert list(tok.encode('Is it a dog?. Yes'))[-3:] == [1929, 41251, 1958]


@pytest.mark.parametrize('bad, kind', [(None, 'NoneType'), (b'a dog', 'bytes'), (42, 'int'),
                                       (bytearray(b'x'), 'bytearray')])
def test_texts_that_are_not_strings_are_named(tok, bad, kind):
    with pytest.raises(TypeError, match=f'^texts: expected a string or a list of strings, got {kind}'):
        tok(bad)
