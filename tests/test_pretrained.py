"Loading checkpoints: file forms, strictness, the errors of broken files and of a missing network, precisions."
import argparse, contextlib, dataclasses, re, warnings

import pytest
import torch

import flair_min
from flair_min.model import FLAIR, FlairConfig, PRECISIONS, image_transform
from flair_min.checkpoint import (StateDictMismatchError, download_weights_from_hf, load_checkpoint, read_checkpoint,
                                  save_checkpoint)
from flair_min.pretrained import create_model, create_model_and_transforms, get_pretrained_cfg, list_pretrained


def close(a, b, eps=1e-5):
    torch.testing.assert_close(a, b, atol=eps, rtol=0)


def forms(sd):
    prefixed = {'module.' + k: v for k, v in sd.items()}
    return {'bare': sd, 'wrapped': {'state_dict': sd, 'epoch': 32}, 'module.': prefixed,
            'training checkpoint': {'epoch': 32, 'name': 'run', 'state_dict': prefixed,
                                    'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4, 'betas': (0.9, 0.98)}]}}}


@pytest.mark.parametrize('form', ['bare', 'wrapped', 'module.', 'training checkpoint'])
@pytest.mark.parametrize('name', ['tiny', 'config'])
def test_saved_checkpoint_through_front_door(flair_tiny, tmp_path, form, name):
    path = tmp_path / 'ckpt.pt'
    torch.save(forms(flair_tiny['state_dict'])[form], path)
    model, train_tf, val_tf = create_model_and_transforms('tiny' if name == 'tiny' else FlairConfig.tiny(),
                                                          pretrained=path)
    with torch.no_grad():
        per_image, per_text = model.get_logits(image=flair_tiny['images'], text=flair_tiny['texts'])
        clip_image, clip_text = model.get_logits_as_clip(image=flair_tiny['images'], text=flair_tiny['texts'])
    close(per_image, flair_tiny['get_logits.image']); close(per_text, flair_tiny['get_logits.text'])
    close(clip_image, flair_tiny['get_logits_as_clip.image']); close(clip_text, flair_tiny['get_logits_as_clip.text'])
    assert str(val_tf) == str(image_transform(32)) and 'RandomResizedCrop' in str(train_tf)


def test_load_checkpoint_accepts_dicts_and_paths(flair_tiny, tmp_path):
    torch.save(flair_tiny['state_dict'], tmp_path / 'sd.pt')
    for source in (forms(flair_tiny['state_dict'])['training checkpoint'], tmp_path / 'sd.pt', str(tmp_path / 'sd.pt')):
        model = load_checkpoint(FLAIR(FlairConfig.tiny()), source)
        close(model.logit_bias.detach(), flair_tiny['state_dict']['logit_bias'])


def test_random_init_and_presets():
    model, _, val_tf = create_model_and_transforms('tiny')
    assert model.config == FlairConfig.tiny() and not any(p.is_meta for p in model.parameters())
    close(model.logit_scale.detach(), torch.tensor(2.659260036932778))
    close(model.logit_bias.detach(), torch.tensor(-10.))
    with pytest.raises(ValueError, match='unknown model name'):
        create_model('ViT-B-32')
    with pytest.raises(TypeError, match='FlairConfig'):
        create_model(42)


@pytest.mark.parametrize('precision', [p for p in PRECISIONS if p != 'auto'])
def test_precisions(flair_tiny, tmp_path, precision):
    torch.save(flair_tiny['state_dict'], tmp_path / 'sd.pt')
    model = create_model('tiny', pretrained=tmp_path / 'sd.pt', precision=precision)
    assert {p.dtype for p in model.parameters()} == {PRECISIONS[precision][0]}
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'amp'):
        out = model.get_logits(flair_tiny['images'], flair_tiny['texts'])[0].float()
    close(out, flair_tiny['get_logits.image'], eps=1e-5 if precision == 'fp32' else 0.2)
    with pytest.raises(ValueError, match='precision'):
        create_model('tiny', precision='int8')


def mismatch(sd, kind):
    sd = dict(sd)
    if kind == 'missing': del sd['ln_final.bias']
    if kind == 'unexpected': sd['visual.proj'] = torch.zeros(128, 64)
    if kind == 'shape': sd['text_post.proj'] = torch.zeros(128, 32)
    return sd


@pytest.mark.parametrize('kind,expected', [('missing', "missing keys 1: ['ln_final.bias']"),
                                           ('unexpected', "unexpected keys 1: ['visual.proj']"),
                                           ('shape', "('text_post.proj', (128, 32), (128, 64))")])
def test_mismatched_checkpoint_is_refused(flair_tiny, tmp_path, kind, expected):
    torch.save({'state_dict': mismatch(flair_tiny['state_dict'], kind)}, tmp_path / 'bad.pt')
    with pytest.raises(StateDictMismatchError) as e:
        create_model('tiny', pretrained=tmp_path / 'bad.pt')
    assert expected in str(e.value)


def test_one_error_lists_all_mismatches(flair_tiny, tmp_path):
    sd = mismatch(mismatch(mismatch(flair_tiny['state_dict'], 'missing'), 'unexpected'), 'shape')
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(StateDictMismatchError) as e:
        create_model('tiny', pretrained=tmp_path / 'bad.pt')
    for expected in ("missing keys 1: ['ln_final.bias']", "unexpected keys 1: ['visual.proj']",
                     "('text_post.proj', (128, 32), (128, 64))"):
        assert expected in str(e.value)


def test_tiny_weights_into_vit_b16_is_refused(flair_tiny, tmp_path):
    torch.save(flair_tiny['state_dict'], tmp_path / 'tiny.pt')
    with pytest.raises(StateDictMismatchError, match='missing keys 240'):
        create_model('ViT-B-16-FLAIR', pretrained=tmp_path / 'tiny.pt')


def test_broken_files(flair_tiny, tmp_path):
    (tmp_path / 'page.pt').write_text('<html>404 Not Found</html>\n')
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save(flair_tiny['state_dict'], tmp_path / 'good.pt')
    good = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(good[:len(good) // 2])
    torch.save({'epoch': 3, 'note': 'no weights'}, tmp_path / 'no_tensors.pt')
    cases = [('missing.pt', FileNotFoundError, 'not found'), ('page.pt', ValueError, 'is not a PyTorch checkpoint'),
             ('empty.pt', ValueError, 'is not a PyTorch checkpoint'),
             ('truncated.pt', ValueError, 'truncated or corrupted'),
             ('no_tensors.pt', ValueError, 'expected a state dict')]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            (create_model('tiny', pretrained=tmp_path / name) if name != 'missing.pt'
             else read_checkpoint(tmp_path / name))


@pytest.mark.parametrize('zip_format', [True, False])
def test_pickle_refused_by_weights_only(flair_tiny, tmp_path, zip_format):
    torch.save({'state_dict': flair_tiny['state_dict'], 'args': argparse.Namespace(lr=5e-4)}, tmp_path / 'objects.pt',
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match='refused to unpickle') as e:
        create_model('tiny', pretrained=tmp_path / 'objects.pt')
    assert 'argparse.Namespace' in str(e.value) and 'weights_only=False' in str(e.value)


@pytest.mark.parametrize('bad', [5, 2.5, ['flair-cc3m-recap.pt'], b'weights.pt'])
def test_pretrained_of_another_type_is_named(bad):
    with pytest.raises(TypeError, match=rf"^pretrained={re.escape(repr(bad))}: expected a path, a released tag "
                                        r"\('cc3m-recap', .*\) or a state dict, got " + type(bad).__name__):
        create_model_and_transforms('tiny', pretrained=bad)


def test_no_network_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    for call in (lambda: download_weights_from_hf('xiaorui638/flair', 'flair-cc3m-recap.pt', cache_dir=tmp_path),
                 lambda: create_model('ViT-B-16-FLAIR', pretrained='flair-cc3m-recap.pt', cache_dir=tmp_path)):
        with pytest.raises(ConnectionError) as e:
            call()
        msg = str(e.value)
        assert 'pass its local path' in msg and "'xiaorui638/flair'" in msg and 'flair-cc3m-recap.pt' in msg


def test_connection_error_says_what_to_do(monkeypatch):
    import huggingface_hub
    def no_network(**kwargs): raise ConnectionError('Name or service not known')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    with pytest.raises(ConnectionError, match='pass its local path'):
        download_weights_from_hf(filename='flair-merged30m.pt')


def test_released_file_names_go_to_the_hub(flair_tiny, tmp_path, monkeypatch):
    "The released file names work as their tags do (`flair-min eval --pretrained flair-cc3m-recap.pt`)."
    import huggingface_hub
    torch.save({'state_dict': flair_tiny['state_dict']}, tmp_path / 'flair-cc12m-recap.pt')
    calls = []
    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename)); return str(tmp_path / filename)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    monkeypatch.chdir(tmp_path.parent)  # so the bare name is not found as a local file
    create_model(FlairConfig.tiny(), pretrained='flair-cc12m-recap.pt')
    assert calls == [('xiaorui638/flair', 'flair-cc12m-recap.pt')]
    released = [pair for pair in list_pretrained() if get_pretrained_cfg(*pair)['repo']]   # the toy model ships
    assert [get_pretrained_cfg(*pair)['filename'] for pair in released] == [
        'flair-cc3m-recap.pt', 'flair-cc12m-recap.pt', 'flair-yfcc15m-recap.pt', 'flair-merged30m.pt']


def test_minimal_example_names(flair_tiny, tmp_path, monkeypatch):
    """The official minimal example's calls, through `import flair_min as flair`
    (tiny weights stand in for the hub file)."""
    needed = ('download_weights_from_hf', 'create_model_and_transforms', 'get_tokenizer')
    if not all(hasattr(flair_min, n) for n in needed):
        pytest.skip('flair_min/__init__.py does not re-export the pretrained names yet')
    import huggingface_hub
    torch.save({'state_dict': flair_tiny['state_dict']}, tmp_path / 'flair-cc3m-recap.pt')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download',
                        lambda repo_id, filename, cache_dir=None: str(tmp_path / filename))
    flair = flair_min
    pretrained = flair.download_weights_from_hf(model_repo='xiaorui638/flair', filename='flair-cc3m-recap.pt')
    model, _, preprocess = flair.create_model_and_transforms('tiny', pretrained=pretrained)
    model.eval()
    with torch.no_grad():
        close(model.get_logits(image=flair_tiny['images'], text=flair_tiny['texts'])[0], flair_tiny['get_logits.image'])


# ---------------------------------------------------------------- one call loads any checkpoint flair_min writes

FOUR_HEADS = dataclasses.replace(FlairConfig.tiny(), vision_heads=4, text_heads=4)   # not what the shapes suggest


def logits(model, flair_tiny):
    with torch.no_grad(): return model.eval().get_logits(flair_tiny['images'], flair_tiny['texts'])[0]


def test_a_bare_state_dict_loads_with_the_config_its_shapes_imply(flair_tiny, tmp_path):
    "A demo-style file (`save_checkpoint(model.state_dict(), 'flair.pt')`): the shapes give the model, with a warning."
    config = dataclasses.replace(FlairConfig.tiny(), vocab_size=49408, embed_dim=32, init_logit_bias=-5.0)
    torch.manual_seed(0)
    original = FLAIR(config)
    path = save_checkpoint(original.state_dict(), tmp_path / 'flair.pt')
    with pytest.warns(UserWarning, match=r'flair.pt stores no model config: .*assuming width / 64 attention heads '
                                         r'\(2 vision, 2 text\) and 8 pooling heads.*model_name.*--model'):
        model, train_tf, val_tf = create_model_and_transforms(pretrained=path)
    assert dataclasses.replace(model.config, init_logit_bias=-5.0) == config
    close(logits(model, flair_tiny), logits(original, flair_tiny))
    assert str(val_tf) == str(image_transform(32)) and 'RandomResizedCrop' in str(train_tf)


def test_a_flair_min_training_checkpoint_loads_with_its_stored_config(flair_tiny, tmp_path):
    "`flair-min train`'s runs/x/checkpoints/latest.pt: its stored config wins over the shapes; no warning."
    from flair_min.recipe import TrainConfig
    from flair_min.train import Trainer
    torch.manual_seed(0)
    trainer = Trainer(FLAIR(FOUR_HEADS), TrainConfig(steps=1, warmup=1, progress=False, out_dir=str(tmp_path / 'x')))
    latest = trainer.save()
    assert latest == tmp_path / 'x' / 'checkpoints' / 'latest.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = create_model_and_transforms(pretrained=latest)[0]
    assert model.config == FOUR_HEADS
    close(logits(model, flair_tiny), logits(trainer.model, flair_tiny))
    given = create_model(FlairConfig.tiny(), pretrained=latest)        # model_name, when given, wins
    assert given.config == FlairConfig.tiny()
    assert not torch.allclose(logits(given, flair_tiny), logits(trainer.model, flair_tiny), atol=1e-4)


def test_a_released_file_is_vit_b_16_flair_without_a_warning(tmp_path):
    "The released files store no config, and their shapes are the preset's: nothing is guessed."
    with torch.device('meta'): big = FLAIR(FlairConfig())
    shapes = {k: torch.zeros(v.shape) for k, v in big.state_dict().items()}
    path = tmp_path / 'flair-cc3m-recap.pt'
    torch.save({'epoch': 32, 'name': 'cc3m', 'state_dict': {'module.' + k: v for k, v in shapes.items()}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = create_model(pretrained=path)
    assert model.config == FlairConfig()


def test_the_file_is_read_once(flair_tiny, tmp_path, monkeypatch):
    import flair_min.checkpoint
    torch.save({'state_dict': flair_tiny['state_dict'], 'config': dataclasses.asdict(FlairConfig.tiny())},
               tmp_path / 'run.pt')
    loads, load = [], torch.load
    monkeypatch.setattr(flair_min.checkpoint.torch, 'load', lambda *a, **k: loads.append(a) or load(*a, **k))
    create_model_and_transforms(pretrained=tmp_path / 'run.pt')
    assert len(loads) == 1


def test_a_state_dict_in_memory_needs_no_model_name(flair_tiny):
    model = create_model(pretrained={'state_dict': flair_tiny['state_dict'], 'epoch': 3})
    assert model.config == FlairConfig.tiny()
    close(logits(model, flair_tiny), flair_tiny['get_logits.image'])


def test_force_image_size_and_nonfinite_weights_without_a_model_name(flair_tiny, tmp_path):
    torch.save(flair_tiny['state_dict'], tmp_path / 'sd.pt')
    small = create_model(pretrained=tmp_path / 'sd.pt', force_image_size=48)
    assert (small.config.image_size, small.visual.positional_embedding.shape) == (48, (37, 128))
    diverged = {**flair_tiny['state_dict'], 'logit_scale': torch.tensor(float('nan'))}
    torch.save(diverged, tmp_path / 'nan.pt')
    with pytest.warns(UserWarning, match=f"{tmp_path / 'nan.pt'} holds NaN or infinite values in 1 of"):
        create_model(pretrained=tmp_path / 'nan.pt')


def test_list_pretrained_pairs_and_their_cfg():
    assert list_pretrained() == [('ViT-B-16-FLAIR', 'cc3m-recap'), ('ViT-B-16-FLAIR', 'cc12m-recap'),
                                 ('ViT-B-16-FLAIR', 'yfcc15m-recap'), ('ViT-B-16-FLAIR', 'merged30m'),
                                 ('FLAIR-toy', 'toyworld')]
    cfg = get_pretrained_cfg('ViT-B-16-FLAIR', 'cc12m-recap')
    assert (cfg['repo'], cfg['filename'], cfg['data'], cfg['pairs']) == ('xiaorui638/flair', 'flair-cc12m-recap.pt',
                                                                        'CC12M-recap', '10M')
    with pytest.raises(ValueError, match=r"\('tiny', 'cc3m-recap'\).*\('ViT-B-16-FLAIR', 'cc3m-recap'\)"):
        get_pretrained_cfg('tiny', 'cc3m-recap')


@pytest.fixture
def fake_hub(flair_tiny, tmp_path, monkeypatch):
    "hf_hub_download answering every released file with the tiny weights; the calls it got."
    import huggingface_hub
    calls = []
    def download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename, cache_dir))
        torch.save({'state_dict': flair_tiny['state_dict']}, tmp_path / filename)
        return str(tmp_path / filename)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    monkeypatch.chdir(tmp_path.parent)                             # no local file has a released tag's name
    return calls


@pytest.mark.parametrize('model_name', [None, 'ViT-B-16-FLAIR'])
def test_a_released_tag_downloads_its_file(fake_hub, tmp_path, model_name):
    for model, tag in list_pretrained()[:4]:
        with pytest.raises(StateDictMismatchError) if model_name else contextlib.nullcontext():
            create_model_and_transforms(model_name, pretrained=tag, cache_dir=tmp_path / 'cache')
        assert fake_hub[-1] == ('xiaorui638/flair', get_pretrained_cfg(model, tag)['filename'], tmp_path / 'cache')
    assert len(fake_hub) == 4


@pytest.mark.parametrize('pretrained', ['laion2b', 'flair-laion2b.pt', 'no/such/file.pt'])
def test_an_unknown_tag_or_path_lists_the_released_ones(fake_hub, pretrained):
    with pytest.raises(FileNotFoundError, match=rf"pretrained='{re.escape(pretrained)}' .*"
                                                r"\('ViT-B-16-FLAIR', 'cc3m-recap'\)"):
        create_model_and_transforms(pretrained=pretrained)
    with pytest.raises(FileNotFoundError, match="not released for 'tiny'"):
        create_model('tiny', pretrained='cc3m-recap')
    assert fake_hub == []


@torch.no_grad()
def test_the_shipped_toy_model_loads_offline_and_works(fake_hub):
    "The toy model comes with the package: no download; on fresh scenes it retrieves and points far above chance."
    from flair_min.toy_eval import eval_images, localization_results, retrieval_results
    from flair_min.toyworld import ToyWorldConfig, make_eval_split
    path = get_pretrained_cfg('FLAIR-toy', 'toyworld')['path']
    assert path.is_file() and path.stat().st_size < 10 * 2**20                     # shipped, at most about 10 MB
    model, _, preprocess = create_model_and_transforms('FLAIR-toy', pretrained='toyworld')
    assert fake_hub == [] and model.config.image_size == 64 and preprocess.transforms[0].size == 64
    from flair_min.demo import DemoConfig, demo_model_config
    assert model.config == demo_model_config(DemoConfig())                          # the preset is the demo's FLAIR
    model.eval()
    split = make_eval_split(100, ToyWorldConfig(), seed=30_000)                    # scenes it never saw
    images = eval_images(split)
    long = retrieval_results(model, images, split, 'flair')['long_caption']
    assert long['text_to_image_R@5'] > 10 * 5 / 100                                 # chance: 5 / 100
    loc = localization_results(model, images, split, kinds=('attention',))
    assert loc['pointing_game_attention'] > 3 * loc['pointing_game_chance']
