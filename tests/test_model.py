"Parity of flair_min.model with the official FLAIR outputs (flair_tiny.pt), layout of ViT-B-16-FLAIR, preprocessing."
import dataclasses, json, re

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from conftest import REFERENCE
from flair_min.model import FLAIR, FlairConfig, Attention, image_transform
from flair_min.checkpoint import (StateDictMismatchError, config_from_state_dict, load_state_dict_strict,
                                  unwrap_state_dict)

EPS = 1e-5


def close(a, b, eps=EPS):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=eps, rtol=0)


@pytest.fixture(scope='module')
def model(flair_tiny):
    return FLAIR.from_state_dict(flair_tiny['state_dict']).eval()


@pytest.fixture(scope='module')
def outputs(model, flair_tiny):
    images, texts = flair_tiny['images'], flair_tiny['texts']
    with torch.no_grad():
        image_emb, local = model.embed_image(images)
        text_emb = model.embed_text(texts)
        query = text_emb.expand(len(images), -1, -1)
        return dict(
            encode_image=model.encode_image(images), encode_text=model.encode_text(texts),
            image_emb=image_emb, local=local, text_emb=text_emb,
            pool=model.pool(text_emb, local, return_attention=True),
            per_head=model.visual_proj(query, local, local, output_attn_weights=True, average_attn_weights=False),
            get_logits=model.get_logits(images, texts), get_logits_as_clip=model.get_logits_as_clip(images, texts),
            forward=model(images, texts))


def test_tiny_config_is_reference_config(model, flair_tiny):
    c, rc = model.config, flair_tiny['config']
    assert c == FlairConfig.tiny()
    assert (c.embed_dim, c.image_size, c.patch_size, c.vision_width, c.vision_layers) == (
        rc['embed_dim'], *(rc['vision_cfg'][k] for k in ('image_size', 'patch_size', 'width', 'layers')))
    assert (c.context_length, c.vocab_size, c.text_width, c.text_heads, c.text_layers) == tuple(
        rc['text_cfg'][k] for k in ('context_length', 'vocab_size', 'width', 'heads', 'layers'))


def test_tower_outputs(outputs, flair_tiny):
    g, l = outputs['encode_image']
    close(g, flair_tiny['encode_image.global']); close(l, flair_tiny['encode_image.local'])
    g_txt, l_txt = outputs['encode_text']
    close(g_txt, flair_tiny['encode_text.global'])
    assert l_txt.shape == (6, 16, 128)
    close(l_txt[torch.arange(6), flair_tiny['texts'].argmax(-1)], g_txt, eps=0)


def test_projections(outputs, flair_tiny):
    close(outputs['image_emb'], flair_tiny['image_post.global'])
    close(outputs['local'], flair_tiny['image_post.local'])
    close(outputs['text_emb'], flair_tiny['text_post.global'])


def test_pooling_outputs_and_weights(outputs, flair_tiny):
    pooled, weights = outputs['pool']
    close(pooled, flair_tiny['attn_pool.out'])
    close(weights, flair_tiny['attn_pool.weights_avg'])
    per_head_out, per_head = outputs['per_head']
    close(per_head_out, flair_tiny['attn_pool.out'])
    close(per_head, flair_tiny['attn_pool.weights_per_head'])
    close(weights.sum(-1), torch.ones(3, 6), eps=1e-5)


def test_both_logit_kinds(outputs, flair_tiny):
    per_image, per_text = outputs['get_logits']
    close(per_image, flair_tiny['get_logits.image']); close(per_text, flair_tiny['get_logits.text'])
    per_image, per_text = outputs['get_logits_as_clip']
    close(per_image, flair_tiny['get_logits_as_clip.image']); close(per_text, flair_tiny['get_logits_as_clip.text'])


def test_forward_dict(outputs, flair_tiny, model):
    out = outputs['forward']
    assert set(out) == {'image_features', 'image_tokens', 'text_features', 'logit_scale', 'logit_bias', 'visual_proj'}
    close(out['image_features'], flair_tiny['image_post.global'])
    close(out['image_tokens'], flair_tiny['image_post.local'])
    close(out['text_features'], flair_tiny['text_post.global'])
    close(out['logit_scale'], flair_tiny['state_dict']['logit_scale'].exp())
    close(out['logit_bias'], flair_tiny['state_dict']['logit_bias'])
    assert out['visual_proj'] is model.visual_proj
    assert model(texts=flair_tiny['texts'])['image_features'] is None


def test_pool_fused_equals_explicit_and_per_image_texts(model, outputs):
    local, text_emb = outputs['local'], outputs['text_emb']
    pooled, _ = outputs['pool']
    with torch.no_grad():
        close(model.pool(text_emb, local), pooled)
        rows = torch.tensor([[5, 0], [1, 1], [3, 2]])
        close(model.pool(text_emb[rows], local), pooled[torch.arange(3)[:, None], rows])


@pytest.mark.parametrize('wrap', ['bare', 'wrapped', 'module.', 'wrapped+module.'])
def test_from_state_dict_variants(flair_tiny, wrap):
    sd = flair_tiny['state_dict']
    if 'module.' in wrap: sd = {'module.' + k: v for k, v in sd.items()}
    if 'wrapped' in wrap: sd = {'state_dict': sd, 'epoch': 1, 'name': 'x'}
    model = FLAIR.from_state_dict(sd)
    with torch.no_grad():
        close(model.get_logits(flair_tiny['images'], flair_tiny['texts'])[0], flair_tiny['get_logits.image'])


def test_from_state_dict_copies_unless_assign(flair_tiny):
    sd = flair_tiny['state_dict']
    copied = FLAIR.from_state_dict(sd)
    assert copied.logit_bias.data_ptr() != sd['logit_bias'].data_ptr()
    adopted = FLAIR.from_state_dict(dict(sd), assign=True)
    assert adopted.logit_bias.data_ptr() == sd['logit_bias'].data_ptr()
    assert adopted.logit_bias.requires_grad


def test_strict_loading_lists_every_mismatch(flair_tiny):
    bad = {**flair_tiny['state_dict'], 'extra.weight': torch.zeros(1), 'logit_scale': torch.zeros(3)}
    del bad['visual.ln_post.bias']
    with pytest.raises(StateDictMismatchError) as e:
        load_state_dict_strict(FLAIR(FlairConfig.tiny()), bad)
    msg = str(e.value)
    assert "missing keys 1: ['visual.ln_post.bias']" in msg
    assert "unexpected keys 1: ['extra.weight']" in msg
    assert "('logit_scale', (3,), ())" in msg
    with pytest.raises(ValueError, match='not a FLAIR state dict'):
        FLAIR.from_state_dict({'conv.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='expected a state dict'):
        unwrap_state_dict({'epoch': 3})


def test_vit_b16_layout_on_meta():
    released = json.loads((REFERENCE / 'vit_b16_flair_keys.json').read_text())
    with torch.device('meta'):
        model = FLAIR(FlairConfig.from_name('ViT-B-16-FLAIR'))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == released['keys']
    assert sum(p.numel() for p in model.parameters()) == 150_674_434 == released['num_params']
    assert config_from_state_dict(model.state_dict()) == FlairConfig()
    assert all(p.is_meta for p in model.parameters())


def test_gradient_checkpointing_same_gradients(flair_tiny):
    images, texts = flair_tiny['images'], flair_tiny['texts']
    grads = []
    for enable in (False, True):
        model = FLAIR.from_state_dict(flair_tiny['state_dict']).train()
        model.set_grad_checkpointing(enable)
        model.get_logits(images, texts)[0].square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5 * grads[0][k].abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize('causal,zero', [(False, False), (True, False), (False, True)])
def test_attention_matches_torch_multihead_attention(causal, zero):
    torch.manual_seed(0)
    mine, mha = Attention(48, 6, add_zero_attn=zero), nn.MultiheadAttention(48, 6, add_zero_attn=zero, batch_first=True)
    mha.load_state_dict(mine.state_dict())
    x, y = torch.randn(3, 5, 48), torch.randn(3, 9, 48)
    src = x if causal else y
    mask = nn.Transformer.generate_square_subsequent_mask(5) if causal else None
    expected, expected_w = mha(x, src, src, attn_mask=mask, average_attn_weights=False)
    got, got_w = mine(x, src, src, causal=causal, need_weights=True)
    close(got, expected); close(got_w, expected_w, eps=1e-5)
    close(mine(x, src, src, causal=causal)[0], expected)


def test_input_checks(model):
    with pytest.raises(ValueError, match=r'expected shape \(B, 3, 32, 32\)'):
        model.encode_image(torch.zeros(2, 3, 224, 224))
    with pytest.raises(ValueError, match='context_length=16'):
        model.encode_text(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match='integer token ids'):
        model.encode_text(torch.zeros(2, 16))
    with pytest.raises(ValueError, match='joint space'):
        model.pool(torch.zeros(2, 128), torch.zeros(1, 16, 64))


def test_config_validation():
    with pytest.raises(ValueError, match='unknown model name'):
        FlairConfig.from_name('ViT-L-14')
    with pytest.raises(ValueError, match='not divisible'):
        FlairConfig(embed_dim=60)


def reference_images(text_vectors):
    return [Image.fromarray(a.numpy(), mode) for a, mode in
            zip(text_vectors['preprocess.images_uint8'], text_vectors['preprocess.modes'])]


def test_eval_preprocessing_is_bit_exact(text_vectors):
    images = reference_images(text_vectors)
    assert sorted({im.mode for im in images}) == ['L', 'RGB', 'RGBA']
    out = torch.stack([image_transform(224)(im) for im in images])
    torch.testing.assert_close(out, text_vectors["preprocess.output"], atol=1e-5, rtol=0)  # one uint8 level is 1e-2


def test_train_preprocessing(text_vectors):
    tf = image_transform(224, is_train=True)
    for im in reference_images(text_vectors):
        x = tf(im)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.manual_seed(0); a = tf(reference_images(text_vectors)[0])
    torch.manual_seed(0); b = tf(reference_images(text_vectors)[0])
    torch.testing.assert_close(a, b)


def test_length_buckets_are_exact(flair_tiny):
    "embed_text's length buckets (each trimmed to its longest end-of-text) give the untrimmed values and gradients."
    g = torch.Generator().manual_seed(0)
    texts = torch.zeros(40, 16, dtype=torch.long)
    for row, n in zip(texts, torch.randint(1, 14, (40,), generator=g).tolist()):        # [SOT, n ids, EOT, 0 ...]
        row[0], row[n + 1], row[1:n + 1] = 998, 999, torch.randint(1, 998, (n,), generator=g)
    results = []
    for bucket_size in (None, 7, 64):
        model = FLAIR.from_state_dict(flair_tiny['state_dict'])
        emb = (model.text_post(model.encode_text(texts)[0]) if bucket_size is None
               else model.embed_text(texts, bucket_size=bucket_size))                    # None: every position
        (emb.square().sum()).backward()
        results.append((emb.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), *others = results
    for emb, grads in others:
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5 * ref_grads[name].abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize('field, value, expected', [
    ('patch_size', 0, 'patch_size=0: expected an int >= 1'),
    ('vision_heads', 0, 'vision_heads=0: expected an int >= 1'),
    ('text_layers', 0, 'text_layers=0: expected an int >= 1'),
    ('vision_layers', -1, 'vision_layers=-1: expected an int >= 1'),
    ('vocab_size', 'big', "vocab_size='big': expected an int >= 1"),
    ('embed_dim', 64.0, 'embed_dim=64.0: expected an int >= 1'),
    ('image_size', True, 'image_size=True: expected an int >= 1'),
    ('context_length', 1, 'context_length=1: expected an int >= 2'),
    ('pool_heads', None, 'pool_heads=None: expected an int >= 1'),
    ('mlp_ratio', 0, 'mlp_ratio=0: expected a finite number > 0'),
    ('mlp_ratio', float('nan'), 'mlp_ratio=nan: expected a finite number > 0'),
    ('init_logit_scale', float('inf'), 'init_logit_scale=inf: expected a finite number'),
    ('init_logit_bias', '-10', "init_logit_bias='-10': expected a finite number"),
    ('image_size', 36, 'image_size=36 is not a multiple of patch_size=8'),
    ('vision_width', 129, 'vision_width=129 is not divisible by vision_heads=2'),
    ('text_heads', 3, 'text_width=128 is not divisible by text_heads=3'),
    ('embed_dim', 60, 'embed_dim=60 is not divisible by pool_heads=8'),
])
def test_every_config_field_is_checked(field, value, expected):
    "A bad field is named with what was expected, as a ValueError, before any layer is built."
    with pytest.raises(ValueError, match=re.escape(expected)):
        dataclasses.replace(FlairConfig.tiny(), **{field: value})


def test_config_names_every_problem_at_once():
    with pytest.raises(ValueError) as e:
        dataclasses.replace(FlairConfig.tiny(), patch_size=0, text_layers=0, mlp_ratio=-1)
    assert str(e.value) == ('patch_size=0: expected an int >= 1; text_layers=0: expected an int >= 1; '
                            'mlp_ratio=-1: expected a finite number > 0')


def test_resolve_names_where_the_config_came_from(tmp_path):
    with pytest.raises(ValueError, match=r"^--model: patch_size=0: expected an int >= 1$"):
        FlairConfig.resolve('{"preset": "tiny", "patch_size": 0}', source='--model')
    with pytest.raises(ValueError, match=r"^--model: not valid JSON \(Expecting .*line 1 column \d+\)"):
        FlairConfig.resolve('{"preset": "tiny",', source='--model')
    (tmp_path / 'bad.json').write_text('{"preset": "tiny" "vocab_size": 5}')
    with pytest.raises(ValueError, match=rf"^--model: {re.escape(str(tmp_path / 'bad.json'))} is not valid JSON"):
        FlairConfig.resolve(str(tmp_path / 'bad.json'), source='--model')
    (tmp_path / 'list.json').write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"^--model: expected a JSON object of FlairConfig fields, got a list"):
        FlairConfig.resolve(tmp_path / 'list.json', source='--model')
    with pytest.raises(ValueError, match=r"^--model: unknown model name 'huge'"):
        FlairConfig.resolve({'preset': 'huge'}, source='--model')
    with pytest.raises(ValueError, match=r"^model: vocab_size='big'"):   # the default source: the argument's name
        FlairConfig.resolve({'preset': 'tiny', 'vocab_size': 'big'})


def test_sixteen_bit_grey_is_scaled_not_clipped_by_the_evaluation_transform():
    "PIL's convert('RGB') clips 16-bit values above 255 to white; convert_to_rgb scales them to 8 bits first."
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)   # mode 'I;16'
    x = image_transform(64)(Image.fromarray(ramp))                             # (3, 64, 64), normalised
    pixels = x[0] * 0.26862954 + 0.48145466                                   # back to [0, 1]
    assert pixels.min() < 0.05 and pixels.max() > 0.95 and (pixels > 0.99).float().mean() < 0.05
