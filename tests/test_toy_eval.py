"""Evaluating a model on the toy world's held-out split (nbs/16_toy_eval): the pieces against naive versions."""
import numpy as np
import pytest
import torch

from flair_min.localization import patch_coverage
from flair_min.model import FLAIR, FlairConfig
from flair_min.retrieval import image_to_text_ranks, retrieval_metrics, text_to_image_ranks
from flair_min.toy_eval import (ATTRIBUTES, eval_images, fine_grained_texts, linear_probe, object_tokens,
                                own_image_maps, swapped_sentences, text_swap_similarity, tokenize_texts)
from flair_min.toyworld import make_eval_split


def toy_model(vision_layers: int = 1, text_layers: int = 1, embed_dim: int = 128) -> FLAIR:
    "An untrained toy FLAIR of the demo's size family: 64-pixel images in 8-pixel patches, 77-token CLIP text."
    torch.manual_seed(0)
    return FLAIR(FlairConfig(embed_dim=embed_dim, image_size=64, patch_size=8, vision_width=64,
                             vision_layers=vision_layers, vision_heads=1, context_length=77, vocab_size=49408,
                             text_width=64, text_layers=text_layers, text_heads=1)).eval()


def naive_fine_grained(scores, txt2img):
    """Loop version: t→i rank of each text's image among all images; i→t best rank of an image's texts,
    images with texts only."""
    t2i = [int((scores[:, t] > scores[txt2img[t], t]).sum()
               + ((scores[:, t] == scores[txt2img[t], t]) & (torch.arange(len(scores)) < txt2img[t])).sum())
           for t in range(scores.shape[1])]
    i2t = []
    for i in range(scores.shape[0]):
        own = [t for t in range(scores.shape[1]) if txt2img[t] == i]
        if not own: continue
        ranks = [int((scores[i] > scores[i, t]).sum()
                     + ((scores[i] == scores[i, t]) & (torch.arange(scores.shape[1]) < t)).sum()) for t in own]
        i2t.append(min(ranks))
    return np.array(t2i), np.array(i2t)


def old_fine_grained_metrics(scores: torch.Tensor, txt2img: torch.Tensor) -> dict:
    "The demo's own metrics before it used retrieval_metrics: i→t over the images that have a text only."
    has_text = torch.bincount(txt2img, minlength=scores.shape[0]) > 0                 # (M,)
    position = torch.cumsum(has_text, 0) - 1                                           # image index among those kept
    out = {}
    for direction, ranks in (('text_to_image', text_to_image_ranks(scores, txt2img)),
                             ('image_to_text', image_to_text_ranks(scores[has_text], position[txt2img]))):
        out.update({f'{direction}_R@{k}': (ranks < k).double().mean().item() for k in (1, 5, 10)})
        out[f'{direction}_mean_rank'] = ranks.double().mean().item() + 1
        out[f'{direction}_median_rank'] = float(np.floor(np.median(ranks.numpy())) + 1)  # numpy's median, floored
    return out


@pytest.mark.parametrize('seed', range(5))
def test_fine_grained_retrieval_metrics_against_loops(seed):
    "Texts of only some images: retrieval_metrics gives the loops' ranks and the demo's former numbers."
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (12, 30), generator=g).float()       # many ties on purpose
    txt2img = torch.randint(0, 9, (30,), generator=g)                  # images 9..11 (and maybe others) have no text
    t2i, i2t = naive_fine_grained(scores, txt2img)
    m = retrieval_metrics(scores, txt2img)
    for k in (1, 5, 10):
        assert m[f'text_to_image_R@{k}'] == pytest.approx((t2i < k).mean())
        assert m[f'image_to_text_R@{k}'] == pytest.approx((i2t < k).mean())
    assert m['text_to_image_mean_rank'] == pytest.approx(t2i.mean() + 1)
    assert m['image_to_text_median_rank'] == np.floor(np.median(i2t)) + 1
    assert m == pytest.approx(old_fine_grained_metrics(scores, txt2img), abs=1e-12)


def test_fine_grained_retrieval_metrics_on_a_fixed_case():
    "Three images, four texts, image 2 without a text: the numbers the demo reported before."
    s = torch.tensor([[5., 1., 0., 2.], [1., 4., 3., 0.], [9., 9., 9., 9.]])
    txt2img = torch.tensor([0, 1, 1, 0])
    m = retrieval_metrics(s, txt2img)
    assert m == pytest.approx(old_fine_grained_metrics(s, txt2img), abs=1e-12)
    assert (m['text_to_image_R@1'], m['text_to_image_R@5'], m['image_to_text_R@1']) == (0.0, 1.0, 1.0)


def test_fine_grained_texts_are_unique():
    split = make_eval_split(40, seed=10_000)
    texts, txt2img = fine_grained_texts(split)
    assert len(texts) == len(set(texts.tolist())) > 0
    sentences = split['sentences'].tolist()
    for text, image in zip(texts.tolist(), txt2img.tolist()):
        holders = {int(split['sentence_image'][i]) for i, s in enumerate(sentences) if s == text}
        assert holders == {image}
    assert all(t.startswith('A ') for t in texts.tolist())                  # object sentences only


def test_tokenize_texts_keeps_the_full_context():
    "No trimming in the helper: the text tower trims each batch to its last end-of-text itself."
    ids = tokenize_texts(np.array(['A small red star in the bottom left', 'There are four objects']))
    assert ids.shape == (2, 77)
    model = toy_model()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_text(ids), model.embed_text(ids[:, :12]), rtol=1e-5, atol=1e-5)


def test_own_image_maps():
    model = toy_model()
    images, ids, txt2img = (torch.randn(3, 3, 64, 64),
                            tokenize_texts(['A small red star in the center'] * 2 + ['There is one object']),
                            torch.tensor([2, 0, 1]))
    attention = own_image_maps(model, images, ids, txt2img, 'attention')
    similarity = own_image_maps(model, images, ids, txt2img, 'patch_cosine')
    assert attention.shape == similarity.shape == (3, 8, 8)
    with torch.no_grad():                                                  # each map is the one of its own image
        _, weights = model.pool(model.embed_text(ids[:1]), model.embed_image(images[2:3])[1], return_attention=True)
    torch.testing.assert_close(attention[0].flatten(), weights[0, 0, :-1], rtol=1e-5, atol=1e-5)
    assert similarity.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="expected one of"):
        own_image_maps(model, images, ids, txt2img, 'saliency')


@pytest.mark.parametrize('attribute', ['shape', 'colour', 'size', 'position'])
def test_swapped_sentences_change_one_attribute_and_are_false(attribute):
    split = make_eval_split(12, seed=5)
    keep, swapped = swapped_sentences(split, attribute, seed=1)
    assert len(keep) == int((split['sentence_object'] >= 0).sum())
    column = ATTRIBUTES.index(attribute)
    names = [split[f'{a}_names'] for a in ATTRIBUTES]
    for s, text in zip(keep, swapped):
        true_words = set(str(split['sentences'][s]).split()); new_words = set(text.split())
        assert true_words != new_words
        changed_name = [str(n) for n in names[column] if str(n) in text and str(n) not in str(split['sentences'][s])]
        assert changed_name, (split['sentences'][s], text)          # the new value of that attribute appears
        own = split['sentences'][split['sentence_image'] == split['sentence_image'][s]]
        assert text not in own                                       # and the swap is false of the image


def test_linear_probe_separates_signal_from_noise():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g)
    y = torch.argmax(x[:, :5], dim=1)                                 # five classes, linear in x
    assert linear_probe(x, y) > 0.85
    assert linear_probe(torch.randn(600, 16, generator=g), y) < 0.35   # chance 0.2


def test_object_tokens_average_the_covered_patches():
    split = make_eval_split(4, seed=2)
    model = toy_model(vision_layers=3, text_layers=2, embed_dim=32)
    images = eval_images(split)
    tokens, attributes = object_tokens(model, images, split)
    keep = np.flatnonzero(split['sentence_object'] >= 0)
    assert tokens.shape == (len(keep), 32) and attributes.shape == (len(keep), 4)
    with torch.no_grad(): _, local = model.embed_image(images)
    # the first object by a loop: weighted mean over its patches
    s = 0
    cover = patch_coverage(split['masks'][keep[s]][None], 8)[0].reshape(-1)
    expected = (torch.as_tensor(cover, dtype=torch.float32)[:, None]
                * local[int(split['sentence_image'][keep[s]])]).sum(0) / cover.sum()
    assert torch.allclose(tokens[s], expected, atol=1e-5)


def test_text_swap_similarity_against_a_loop():
    split = make_eval_split(4, seed=2)
    model = toy_model(vision_layers=3, text_layers=2, embed_dim=32)
    sims = text_swap_similarity(model, split, seed=4)
    keep, swapped = swapped_sentences(split, 'colour', seed=4)
    with torch.no_grad():
        cosines = [torch.nn.functional.cosine_similarity(model.embed_text(tokenize_texts([str(split['sentences'][s])])),
                                                         model.embed_text(tokenize_texts([t])))[0]
                   for s, t in zip(keep, swapped)]
    assert sims['colour'] == pytest.approx(float(torch.stack(cosines).mean()), abs=1e-5)
    assert all(-1 <= v <= 1 for v in sims.values())
