"""Retrieval scoring and metrics: parity with the official numbers in flair_tiny.pt, the fast path
against the official per-image loop on random pooling layers, and the ranking rules against a
sort-based re-implementation of the official `compute_retrieval`."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flair_min.model import FLAIR, FlairConfig, TextConditionedPooling
from flair_min.retrieval import (MODES, OUTSIDE_TOPK, image_to_text_ranks, pooling_weights, prepare_texts,
                                 retrieval_metrics, retrieval_scores, score_embeddings, text_to_image_ranks,
                                 topk_scores)


@pytest.fixture(scope='module')
def tiny(flair_tiny):
    return FLAIR.from_state_dict(flair_tiny['state_dict']).eval()


@pytest.mark.parametrize('mode', MODES)
def test_scores_and_metrics_match_official(tiny, flair_tiny, mode):
    images, texts, txt2img = (flair_tiny['retrieval.images'], flair_tiny['retrieval.texts'],
                              flair_tiny['retrieval.txt2img'])
    loader = DataLoader(TensorDataset(images, torch.arange(8)), batch_size=3)          # yields (images, ids) pairs
    scores = retrieval_scores(tiny, loader, texts, mode, topk=flair_tiny['retrieval.topk'], text_batch_size=5,
                              chunk_size=11)
    if mode == 'topk':
        idx = flair_tiny['retrieval.topk_indices']
        torch.testing.assert_close(scores.gather(1, idx), flair_tiny['retrieval.scores_topk'], atol=1e-5, rtol=0)
        outside = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)
        assert (scores[outside] == OUTSIDE_TOPK).all()
    else:
        torch.testing.assert_close(scores, flair_tiny[f'retrieval.scores_{mode}'], atol=1e-5, rtol=0)
    ours, official = retrieval_metrics(scores, txt2img), flair_tiny[f'retrieval.metrics_{mode}']
    assert list(ours) == list(official)
    for key, value in official.items(): assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_topk_indices_match_official(tiny, flair_tiny):
    with torch.no_grad():
        global_emb, local = tiny.embed_image(flair_tiny['retrieval.images'])
        weights = pooling_weights(tiny.visual_proj)
        texts = prepare_texts(tiny.embed_text(flair_tiny['retrieval.texts']), weights)
    scores, idx = topk_scores(global_emb, local, texts, weights, tiny.logit_scale.exp(), k=4)
    assert torch.equal(idx, flair_tiny['retrieval.topk_indices'])


@torch.no_grad()
def per_image_scores(text_emb, global_emb, local, visual_proj, scale, mode='flair', topk=128):
    "The official loop: image by image, the full pooling layer on all texts (or the image's top-k) → (B, N) scores."
    unit = F.normalize(text_emb.float(), dim=-1)                                      # (N, D)
    if mode == 'global': return scale * F.normalize(global_emb.float(), dim=-1) @ unit.T
    rows = []
    for i in range(local.shape[0]):
        idx = slice(None)                                                             # all texts, or the top-k:
        if mode == 'topk': idx = (F.normalize(global_emb[i].float(), dim=-1) @ unit.T).topk(min(topk, len(unit)))[1]
        pooled = visual_proj(text_emb[idx][None], local[i:i + 1], local[i:i + 1])[0].float()   # (N or k, D)
        row = torch.full((len(unit),), OUTSIDE_TOPK)
        row[idx] = scale * (F.normalize(pooled, dim=-1) * unit[idx]).sum(-1)
        rows.append(row)
    return torch.stack(rows)                                                          # (B, N)


def random_pool(D=64, seed=0):
    torch.manual_seed(seed)
    pool = TextConditionedPooling(D, 8).eval()
    for p in pool.parameters(): torch.nn.init.normal_(p, std=0.2)   # LayerNorm gains and biases too
    return pool


@pytest.mark.parametrize('chunk_size', [3, 100, 10_000])
@pytest.mark.parametrize('mode,topk', [('flair', 0), ('topk', 1), ('topk', 6), ('topk', 37), ('global', 0)])
def test_fast_path_equals_per_image_loop(mode, topk, chunk_size):
    pool, (B, L, N, D) = random_pool(), (5, 49, 37, 64)
    g = torch.Generator().manual_seed(1)
    text_emb, global_emb, local = (torch.randn(*s, generator=g) for s in ((N, D), (B, D), (B, L, D)))
    expected = per_image_scores(text_emb, global_emb, local, pool, 3.0, mode, topk or 1)
    got = score_embeddings(global_emb, local, text_emb, pool, 3.0, mode, topk or 1, chunk_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_topk_with_every_text_is_flair_mode():
    pool, g = random_pool(seed=3), torch.Generator().manual_seed(2)
    text_emb, global_emb, local = (torch.randn(9, 64, generator=g), torch.randn(4, 64, generator=g),
                                   torch.randn(4, 10, 64, generator=g))
    flair = score_embeddings(global_emb, local, text_emb, pool, 1.0, 'flair')
    torch.testing.assert_close(score_embeddings(global_emb, local, text_emb, pool, 1.0, 'topk', topk=500), flair)


def official_metrics(scores, txt2img):
    """The official compute_retrieval, written with a stable argsort (ties: lower index first); images without a text
    have no image → text rank and are skipped."""
    img2txt = {}
    for t, i in enumerate(txt2img.tolist()): img2txt.setdefault(i, []).append(t)
    t2i = torch.tensor([float(torch.where(torch.argsort(s, descending=True, stable=True) == txt2img[t])[0][0])
                        for t, s in enumerate(scores.t())])
    i2t = torch.tensor([float(min(torch.where(torch.argsort(s, descending=True, stable=True) == t)[0][0]
                                  for t in img2txt[i]))
                        for i, s in enumerate(scores) if i in img2txt])
    out = {}
    for name, ranks in (('text_to_image', t2i), ('image_to_text', i2t)):
        for k in (1, 5, 10): out[f'{name}_R@{k}'] = (ranks < k).double().mean().item()
        out[f'{name}_mean_rank'] = ranks.double().mean().item() + 1
        out[f'{name}_median_rank'] = math.floor(ranks.double().quantile(0.5).item()) + 1
    return out, t2i.long(), i2t.long()


@pytest.mark.parametrize('seed', range(6))
def test_ranks_match_sort_based_official_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    M, N = 7, 23
    txt2img = torch.cat([torch.arange(M), torch.randint(0, M, (N - M,), generator=g)])[torch.randperm(N, generator=g)]
    scores = torch.randint(0, 4, (M, N), generator=g).float()          # few distinct values: many ties
    expected, t2i, i2t = official_metrics(scores, txt2img)
    assert torch.equal(text_to_image_ranks(scores, txt2img, chunk=5), t2i)
    assert torch.equal(image_to_text_ranks(scores, txt2img, chunk=3), i2t)
    got = retrieval_metrics(scores, txt2img)
    for key in expected: assert got[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize('seed', range(6))
def test_images_without_a_text_are_skipped_in_image_to_text(seed):
    "Texts for some of the images: text → image over all images, image → text over the images that have a text."
    g = torch.Generator().manual_seed(seed)
    n_images, n_texts = 9, 14
    owners = torch.randperm(n_images, generator=g)[:5]                  # 4 images own no text
    txt2img = owners[torch.randint(0, 5, (n_texts,), generator=g)]
    scores = torch.randint(0, 4, (n_images, n_texts), generator=g).float()   # few distinct values: many ties
    expected, t2i, i2t = official_metrics(scores, txt2img)
    has_text = torch.bincount(txt2img, minlength=n_images) > 0
    assert len(i2t) == int(has_text.sum()) < n_images
    assert torch.equal(text_to_image_ranks(scores, txt2img), t2i)
    assert torch.equal(image_to_text_ranks(scores, txt2img, chunk=2), i2t)
    got = retrieval_metrics(scores, txt2img)
    assert list(got) == list(expected)
    for key in expected: assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # the same as dropping the text-less images from image → text only (the texts keep every image as a candidate)
    kept = retrieval_metrics(scores[has_text], (torch.cumsum(has_text, 0) - 1)[txt2img])
    for key in expected:
        if key.startswith('image_to_text'): assert got[key] == pytest.approx(kept[key], abs=1e-12), key


def test_metrics_on_perfect_and_reversed_scores():
    txt2img = torch.tensor([0, 0, 1, 2, 2, 2])
    perfect = F.one_hot(txt2img, 3).float().t()                         # (3, 6): own pairs 1, others 0
    m = retrieval_metrics(perfect, txt2img)
    assert m['text_to_image_R@1'] == m['image_to_text_R@1'] == 1.0
    assert m['text_to_image_mean_rank'] == m['image_to_text_median_rank'] == 1.0
    m = retrieval_metrics(-perfect, txt2img)                            # own pairs last
    assert m['text_to_image_R@1'] == 0.0 and m['text_to_image_mean_rank'] == 3.0
    # each image's own texts score -1, all others 0: its best own text sits behind every other text
    assert image_to_text_ranks(-perfect, txt2img).tolist() == [4, 5, 3]


def test_bad_inputs_raise_clear_errors(tiny, flair_tiny):
    images, texts = flair_tiny['retrieval.images'], flair_tiny['retrieval.texts']
    with pytest.raises(ValueError, match="expected one of"): retrieval_scores(tiny, [images], texts, 'local')
    with pytest.raises(ValueError, match='topk=0'): retrieval_scores(tiny, [images], texts, 'topk', topk=0)
    with pytest.raises(ValueError, match='chunk_size=0'): retrieval_scores(tiny, [images], texts, chunk_size=0)
    with pytest.raises(ValueError, match='token ids'): retrieval_scores(tiny, [images], texts[0])
    with pytest.raises(ValueError, match='expected one of'): retrieval_scores(tiny, [images], texts, precision='fp8')
    with pytest.raises(ValueError, match='13 integer image indices'):
        retrieval_metrics(torch.zeros(8, 13), torch.zeros(12, dtype=torch.long))


@pytest.fixture(scope='module')
def nan_model():
    "The tiny FLAIR with every weight NaN: what a diverged run leaves behind."
    torch.manual_seed(0)
    model = FLAIR(FlairConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters(): p.fill_(math.nan)
    return model


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_not_ranked_first(bad):
    scores = torch.full((4, 4), bad)
    with pytest.raises(ValueError, match=r'scores: 16 of 16 values are not finite .*NaN/inf'):
        retrieval_metrics(scores, torch.arange(4))
    scores = torch.eye(4); scores[2, 1] = bad
    with pytest.raises(ValueError, match=r'1 of 16 values are not finite'): text_to_image_ranks(scores, torch.arange(4))
    with pytest.raises(ValueError, match=r'1 of 16 values are not finite'): image_to_text_ranks(scores, torch.arange(4))


@pytest.mark.parametrize('mode', MODES)
def test_a_nan_model_fails_in_retrieval_scores(nan_model, flair_tiny, mode):
    images, texts = flair_tiny['retrieval.images'], flair_tiny['retrieval.texts']
    with pytest.raises(ValueError, match=r"scores: \d+ of \d+ values are not finite \(nan\).*weights or inputs"):
        retrieval_scores(nan_model, [images[:3], images[3:]], texts, mode, topk=2)


def test_token_ids_outside_the_vocabulary_name_the_argument(tiny, flair_tiny):
    images, texts = flair_tiny['retrieval.images'], flair_tiny['retrieval.texts']
    too_big = texts.clone(); too_big[3, 2] = 1000
    with pytest.raises(ValueError, match=r"texts: got token id 1000, but the model's vocabulary has 1000 entries"):
        retrieval_scores(tiny, [images], too_big)
    negative = texts.clone(); negative[0, 1] = -1
    with pytest.raises(ValueError, match=r"texts: got token id -1, but the model's vocabulary has 1000 entries"):
        retrieval_scores(tiny, [images], negative)


@pytest.mark.parametrize('shape', [(0, 0), (0, 3), (3, 0)])
def test_empty_score_matrix_is_refused(shape):
    txt2img = torch.zeros(shape[1], dtype=torch.long)
    with pytest.raises(ValueError, match=r'scores: got an empty .* matrix; expected at least one image and one text'):
        retrieval_metrics(torch.zeros(shape), txt2img)
