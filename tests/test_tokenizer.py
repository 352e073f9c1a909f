"""Tokenizer parity with the official CLIP tokenizer, and properties over many generated strings."""
import pickle, random, string
import pytest, torch
from hypothesis import given, settings, strategies as st

from flair_min.tokenizer import get_tokenizer, clean_text, pre_tokenize, bpe_merge, bytes_to_unicode, load_merges

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


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(['a red ladybug']), tok(['a red ladybug']))


def test_junction_piece_merges(tok):
    # FLAIR_SPEC §2: '?.' is one regex piece that BPE merges into one token
    assert list(tok.encode('Is it a dog?. Yes'))[-3:] == [1929, 41251, 1958]
