"""FLAIR's losses: parity with the official code on flair_tiny.pt (values, every gradient, the negatives),
the vectorised pieces against plain loops, chunking, and the per-rank normalisation."""
import math
import pytest, torch

from flair_min.model import FLAIR, TextConditionedPooling
from flair_min.losses import (FlairLoss, flair_loss, flair_loss_of_rank, draw_negative_offsets, other_image_indices,
                              downsample_caption_indices, pair_labels, text_conditioned_sigmoid_loss,
                              multi_positive_sigmoid_loss, downsampled_tcs_loss)


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def relative_error(a, b): return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


LOGIT_TOLERANCE = 1e-5   # float32 logits of two correct implementations agree to this (the reference's tolerance)
ROUNDOFF = 2.0 ** -24    # float32's unit round-off


def scalar_gradient_bounds(flair_tiny, add_mps) -> dict:
    """How far a correct float32 implementation's gradients of `logit_scale` (s) and `logit_bias` (b) may lie from
    the official ones: derived, not tuned. Both are sums over every scored pair k, of t_k = w_k a_k and of w_k, where
    w_k = ∂L/∂z_k = -y_k σ(-y_k z_k) ω_k (ω_k: the pair's weight in the loss) and a_k = z_k - b = e^s cos_k. The
    terms cancel (in 'loss.tcs_mps', ∂L/∂s is 0.006 from terms whose absolute values sum to 1.2), so an error
    relative to the sum means nothing. Logits that agree within δ give |Δa_k| <= δ and |Δw_k| <= ω_k δ / 4
    (σ' <= 1/4); each n-term float32 sum adds at most n u Σ|term| (u: the round-off), in each implementation:
        |Δ ∂L/∂s| <= δ Σ_k (|w_k| + ω_k |a_k| / 4) + 2 n u Σ_k |w_k a_k|,  |Δ ∂L/∂b| <= δ Σ_k ω_k / 4 + 2 n u Σ_k |w_k|.
    The terms are computed from the official logits of every pair (`get_logits.image`, `get_logits_as_clip.image`)."""
    b = flair_tiny['state_dict']['logit_bias']
    pooled, caption_indices = flair_tiny['get_logits.image'], flair_tiny['loss.downsampled_caption_indices']
    B, N = pooled.shape                                                        # (B, B·K) official FLAIR logits
    labels = (torch.arange(B)[:, None] == torch.arange(N)[None] // (N // B)).float() * 2 - 1   # (B, N)
    tcs_weight = (0.5 if add_mps else 1.0) / caption_indices.shape[1]
    pairs = [(pooled.gather(1, caption_indices), labels.gather(1, caption_indices), tcs_weight)]   # (B, K+B-1)
    if add_mps: pairs.append((flair_tiny['get_logits_as_clip.image'] + b, labels, 0.5 / N))         # (B, N)
    bounds, n = {'logit_scale': 0.0, 'logit_bias': 0.0}, sum(z.numel() for z, _, _ in pairs)
    for z, y, weight in pairs:
        w, a = -y * torch.sigmoid(-y * z) * weight, z - b
        bounds['logit_scale'] += (LOGIT_TOLERANCE * (w.abs() + weight * a.abs() / 4).sum()
                                  + 2 * n * ROUNDOFF * (w * a).abs().sum()).item()
        bounds['logit_bias'] += (LOGIT_TOLERANCE * weight * z.numel() / 4 + 2 * n * ROUNDOFF * w.abs().sum()).item()
    return bounds


def test_scalar_gradient_bounds_are_tight_enough_to_fail(flair_tiny):
    "The bounds hold for the official terms recomputed, and are far below a wrong normaliser's error."
    bounds = scalar_gradient_bounds(flair_tiny, add_mps=True)
    ref = flair_tiny['loss.tcs_mps.grads']
    assert bounds['logit_scale'] < 1e-4 and bounds['logit_bias'] < 1e-4, bounds
    _, wrong = reference_loss(flair_tiny, add_mps=False)   # tcs alone: a loss weighted 1 instead of 1/2
    for name in bounds: assert abs(wrong[name] - ref[name]) > 100 * bounds[name], name


def reference_loss(flair_tiny, add_mps, chunk_size=None):
    model = FLAIR.from_state_dict(flair_tiny['state_dict'])
    loss = flair_loss(model, flair_tiny['images'], flair_tiny['texts'], num_captions=2, add_mps=add_mps,
                      negative_offsets=flair_tiny['loss.negative_offsets'], chunk_size=chunk_size)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}


def test_downsampled_indices_match_official(flair_tiny):
    assert torch.equal(downsample_caption_indices(flair_tiny['loss.negative_offsets'], 2),
                       flair_tiny['loss.downsampled_caption_indices'])


@pytest.mark.parametrize('key,add_mps,chunk_size', [('loss.tcs', False, None), ('loss.tcs_mps', True, None),
                                                     ('loss.tcs', False, 1), ('loss.tcs_mps', True, 2)])
def test_loss_and_every_gradient_match_official(flair_tiny, key, add_mps, chunk_size):
    loss, grads = reference_loss(flair_tiny, add_mps, chunk_size)
    assert abs(loss.item() - flair_tiny[key].item()) < 1e-5
    ref = flair_tiny[f'{key}.grads']
    assert set(grads) == set(ref) and len(ref) == 73
    scalar_bounds = scalar_gradient_bounds(flair_tiny, add_mps)      # sums that cancel: derived absolute bounds
    for name, g in ref.items():
        if name in scalar_bounds: assert abs(grads[name] - g).item() <= scalar_bounds[name], name
        else: assert relative_error(grads[name], g) < 1e-4, name      # the reference's tolerance on gradients


def naive_downsample(offsets, K):
    B = offsets.shape[0]
    rows = []
    for i in range(B):
        others = [j for j in range(B) if j != i]
        rows.append(sorted([i * K + k for k in range(K)] + [j * K + int(offsets[i, n]) for n, j in enumerate(others)]))
    return torch.tensor(rows, dtype=torch.long).view(B, K + B - 1)


@pytest.mark.parametrize('B,K', [(1, 1), (1, 4), (2, 1), (3, 2), (7, 3), (16, 8)])
def test_downsampling_matches_loop_and_its_properties(B, K):
    g = torch.Generator().manual_seed(B * 100 + K)
    for _ in range(5):
        offsets = draw_negative_offsets(B, K, generator=g)
        assert offsets.shape == (B, B - 1) and (offsets.numel() == 0 or (offsets.min() >= 0 and offsets.max() < K))
        idx = downsample_caption_indices(offsets, K)
        assert torch.equal(idx, naive_downsample(offsets, K))
        owner = idx // K                                                   # (B, K+B-1) image of each caption
        for i in range(B):
            assert (idx[i].diff() > 0).all()                               # sorted, no repeats
            assert torch.equal(idx[i, i:i + K], torch.arange(i * K, i * K + K))  # own captions at i..i+K-1
            assert torch.equal(owner[i].bincount(minlength=B), torch.tensor([K if j == i else 1 for j in range(B)]))


def test_other_image_indices():
    assert torch.equal(other_image_indices(3), torch.tensor([[1, 2], [0, 2], [0, 1]]))
    assert other_image_indices(1).shape == (1, 0)


def test_pair_labels():
    idx = torch.tensor([[0, 1, 3, 5], [0, 2, 3, 4], [0, 3, 4, 5]])
    expected = torch.tensor([[1, 1, -1, -1], [-1, 1, 1, -1], [-1, -1, 1, 1.]])
    assert torch.equal(pair_labels(idx, 2, torch.arange(3)), expected)
    assert torch.equal(pair_labels(idx[1:], 2, torch.arange(1, 3)), expected[1:])  # global image indices
    assert torch.equal(pair_labels(torch.arange(6)[None], 2, torch.arange(3)),
                       torch.block_diag(*[torch.ones(1, 2)] * 3) * 2 - 1)


def test_pure_losses_against_pair_by_pair_formula():
    g = torch.Generator().manual_seed(0)
    B, M, N, D = 3, 4, 6, 8
    pooled, texts, y = (torch.randn(B, M, D, generator=g), torch.randn(B, M, D, generator=g),
                        torch.randn(B, M, generator=g).sign())
    images, all_texts, ym = (torch.randn(B, D, generator=g), torch.randn(N, D, generator=g),
                             torch.randn(B, N, generator=g).sign())
    s, b = 7.0, -3.0
    cos = lambda u, v: (u @ v / (u.norm() * v.norm())).item()
    nll = lambda y, z: math.log1p(math.exp(-y * z))
    tcs = sum(nll(y[i, m].item(), s * cos(pooled[i, m], texts[i, m]) + b) for i in range(B) for m in range(M)) / M
    mps = sum(nll(ym[i, t].item(), s * cos(images[i], all_texts[t]) + b) for i in range(B) for t in range(N)) / N
    assert abs(text_conditioned_sigmoid_loss(pooled, texts, y, s, b).item() - tcs) < 1e-4
    assert abs(multi_positive_sigmoid_loss(images, all_texts, ym, s, b).item() - mps) < 1e-4
    assert abs(text_conditioned_sigmoid_loss(pooled, texts, y, s, b, denominator=1).item() - tcs * M) < 1e-3


def synthetic(B=6, K=3, L=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()
    return dict(image_features=leaf(B, D), image_tokens=leaf(B, L, D), text_features=leaf(B * K, D),
                logit_scale=torch.tensor(10.).requires_grad_(), logit_bias=torch.tensor(-5.).requires_grad_()), \
        draw_negative_offsets(B, K, generator=g)


@pytest.mark.parametrize('chunk_size', [1, 4, 5, 6, 100])
def test_chunked_tcs_equals_unchunked(chunk_size):
    torch.manual_seed(0)
    pool, (batch, offsets) = TextConditionedPooling(16, heads=8), synthetic()
    idx = downsample_caption_indices(offsets, 3)
    y = pair_labels(idx, 3, torch.arange(6))
    leaves = [batch['text_features'], batch['image_tokens'], batch['logit_scale'], batch['logit_bias'],
              *pool.parameters()]
    def run(c):
        loss = downsampled_tcs_loss(pool, batch['text_features'], batch['image_tokens'], idx, y,
                                    batch['logit_scale'], batch['logit_bias'], chunk_size=c)
        return loss, torch.autograd.grad(loss, leaves)
    (l0, g0), (l1, g1) = run(None), run(chunk_size)
    assert abs(l0.item() - l1.item()) < 1e-5 * abs(l0.item())
    for a, b in zip(g1, g0): assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize('W', [2, 3, 6])
@pytest.mark.parametrize('add_mps', [False, True])
def test_rank_losses_average_to_global_batch(W, add_mps):
    "DDP averages gradients: the mean of the W ranks' losses (sharing the gathered texts) must be the global loss."
    torch.manual_seed(0)
    pool, (batch, offsets) = TextConditionedPooling(16, heads=8), synthetic()
    leaves = [*batch.values(), *pool.parameters()]
    def run(W):
        b = 6 // W
        loss = sum(flair_loss_of_rank(batch['image_features'][r * b:(r + 1) * b],
                                      batch['image_tokens'][r * b:(r + 1) * b], batch['text_features'],
                                      batch['logit_scale'], batch['logit_bias'], pool, offsets, 3, add_mps,
                                      rank=r, world=W) for r in range(W)) / W
        return loss, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    (l1, g1), (lw, gw) = run(1), run(W)
    assert abs(l1.item() - lw.item()) < 1e-5 * abs(l1.item())
    for a, b in zip(gw, g1): assert relative_error(a, b) < 1e-5 or b.norm() == 0 == a.norm()


def test_flair_loss_module_api(flair_tiny):
    model = FLAIR.from_state_dict(flair_tiny['state_dict'])
    out = model(flair_tiny['images'], flair_tiny['texts'])
    offsets = flair_tiny['loss.negative_offsets']
    loss = FlairLoss(2)(**out, negative_offsets=offsets)
    assert abs(loss.item() - flair_tiny['loss.tcs_mps'].item()) < 1e-5
    assert FlairLoss(2)(**out, negative_offsets=offsets, output_dict=True).keys() == {'contrastive_loss'}
    a = FlairLoss(2)(**out, generator=torch.Generator().manual_seed(3)).item()
    assert a == FlairLoss(2)(**out, generator=torch.Generator().manual_seed(3)).item()
    with pytest.raises(ValueError, match='num_captions=3'): FlairLoss(3)(**out)
    with pytest.raises(ValueError, match=r'\(B, B-1\)'):
        FlairLoss(2)(**out, negative_offsets=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='num_captions'): FlairLoss(2)(**out, negative_offsets=torch.full((3, 2), 5))
    with pytest.raises(ValueError, match='global batch'):
        FlairLoss(2)(**out, negative_offsets=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match='chunk_size'): FlairLoss(2, chunk_size=0)(**out)


def test_single_image_batch():
    "B = 1: no negatives in the text-conditioned loss; it still runs and is finite."
    torch.manual_seed(0)
    pool, (batch, offsets) = TextConditionedPooling(16, heads=8), synthetic(B=1, K=4)
    loss = FlairLoss(4)(**batch, visual_proj=pool, negative_offsets=offsets)
    loss.backward()
    assert torch.isfinite(loss) and offsets.shape == (1, 0)


@pytest.mark.parametrize('kwargs, expected', [
    (dict(num_captions=0), 'num_captions=0: expected an int >= 1$'),
    (dict(num_captions=-2), 'num_captions=-2: expected an int >= 1$'),
    (dict(num_captions=2.0), 'num_captions=2.0: expected an int >= 1$'),
    (dict(num_captions=True), 'num_captions=True: expected an int >= 1$'),
    (dict(num_captions=2, chunk_size=0), 'chunk_size=0: expected an int >= 1, or None$'),
    (dict(num_captions=0, chunk_size=1.5), r'num_captions=0: expected an int >= 1; chunk_size=1.5: expected an int'),
    (dict(num_captions=2, distributed='all'), r"distributed='all': expected one of \('ring', 'gather'\), True, False"),
])
def test_flair_loss_checks_its_arguments_when_built(kwargs, expected):
    with pytest.raises(ValueError, match=f'^{expected}'):
        FlairLoss(**kwargs)


def test_the_global_baseline_checks_num_captions_when_built():
    from flair_min.losses import MultiPositiveLoss, make_loss
    for build in (lambda: MultiPositiveLoss(0), lambda: make_loss('mps', 0)):
        with pytest.raises(ValueError, match='^num_captions=0: expected an int >= 1$'):
            build()
