"""`flair-min` on bad input: one-line errors with exit status 2 (tracebacks with --debug and for bugs), options checked
as they are parsed, output folders checked before the work, the model's vocabulary checked against the tokenizer, the
stored config of a checkpoint used for evaluation, and the data's skip report at the end of training."""
import argparse, json, subprocess, sys, warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import flair_min.cli as cli
from flair_min.cli import main
from flair_min.checkpoint import StateDictMismatchError, save_checkpoint
from flair_min.model import FLAIR, FlairConfig
from flair_min.tokenizer import get_tokenizer
from flair_min.recipe import TrainConfig
from flair_min.train import Trainer

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py

TINY_CLIP = {'preset': 'tiny', 'vocab_size': 49408}
FOUR_HEADS = {**TINY_CLIP, 'vision_heads': 4, 'text_heads': 4}
BAD_SHARD = ROOT / 'data' / 'toy' / 'bad-samples.tar'


def run_main(argv, capsys):
    "(exit status, stdout, stderr) of `main(argv)`."
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def train_argv(out, *extra, model=json.dumps(TINY_CLIP), data='toy'):
    return ['train', '--data', str(data), '--toy-samples', '16', '--model', model, '--batch-size', '4',
            '--num-captions', '2', '--workers', '0', '--steps', '2', '--warmup', '1', '--out', str(out),
            '--no-progress', *extra]


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    "A tiny model with 4 heads per tower saved as a run saves it ('config' included) and as bare weights."
    tmp = tmp_path_factory.mktemp('checkpoints')
    torch.manual_seed(0)
    model = FLAIR(FlairConfig.resolve(FOUR_HEADS))
    save_checkpoint(Trainer(model, TrainConfig(steps=1, device='cpu', progress=False)).state_dict(), tmp / 'run.pt')
    torch.save(model.state_dict(), tmp / 'weights.pt')
    return tmp, model.eval()


def logits(model):
    torch.manual_seed(1)
    images, texts = torch.randn(2, 3, 32, 32), get_tokenizer(context_length=16)(['a red ball', 'a blue cube'])
    with torch.no_grad(): return model.eval().get_logits(images, texts)[0]


def tiny_coco(root, n=3):
    (root / 'annotations').mkdir(parents=True); (root / 'images' / 'val2017').mkdir(parents=True)
    images = [{'id': i, 'file_name': f'{i}.jpg'} for i in range(n)]
    captions = [{'image_id': i, 'id': i, 'caption': f'picture {i}'} for i in range(n)]
    (root / 'annotations' / 'captions_val2017.json').write_text(json.dumps({'images': images, 'annotations': captions}))
    for i in range(n): Image.new('RGB', (40, 36), (60 * i, 0, 0)).save(root / 'images' / 'val2017' / f'{i}.jpg')
    return root


def tiny_voc(root, n=2):
    rng = np.random.default_rng(0)
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root / d).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / 'JPEGImages' / f'{i}.jpg')
        label = np.zeros((32, 40), np.uint8); label[4:20, 6:30] = 3 + i
        png = Image.fromarray(label, 'P'); png.putpalette([v for c in range(256) for v in (c, c, c)])
        png.save(root / 'SegmentationClass' / f'{i}.png')
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text(''.join(f'{i}\n' for i in range(n)))
    return root


# 1. one line and status 2 for user errors; --debug and bugs keep the traceback

def test_user_error_is_one_line_with_status_2(tmp_path, capsys):
    argv = ['eval', '--pretrained', 'x.pt', '--dataset', 'coco', '--root', str(tmp_path / 'none'),
            '--output', str(tmp_path / 'e.json')]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.startswith(f'flair-min eval: error: annotation file not found: {tmp_path}/none')
    assert 'Traceback' not in err


def test_checkpoint_that_does_not_fit_is_a_user_error(tmp_path, checkpoints, capsys):
    argv = ['visualize', '--pretrained', str(checkpoints[0] / 'weights.pt'), '--model', 'tiny', '--image',
            str(tmp_path / 'photo.png'), '--text', 'a dog', '--out', str(tmp_path / 'maps'), '--device', 'cpu']
    Image.new('RGB', (40, 40)).save(tmp_path / 'photo.png')
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.startswith('flair-min visualize: error: state dict does not match FLAIR')
    with pytest.raises(StateDictMismatchError): main(argv + ['--debug'])


@pytest.mark.parametrize('where', ['before', 'after'])
def test_debug_shows_the_exception(tmp_path, where):
    argv = ['eval', '--pretrained', 'x.pt', '--dataset', 'coco', '--root', str(tmp_path), '--output',
            str(tmp_path / 'e.json')]
    with pytest.raises(FileNotFoundError, match='annotation file not found'):
        main(['--debug', *argv] if where == 'before' else [*argv, '--debug'])


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(args): raise KeyError('a bug, not a user error')
    monkeypatch.setattr(cli, 'run_demo_command', broken)
    with pytest.raises(KeyError, match='a bug'): main(['demo'])


def test_python_m_exits_with_the_status(tmp_path):
    "`python -m flair_min.cli` (the form torchrun needs) runs main and exits 2 on a user error."
    run = subprocess.run([sys.executable, '-m', 'flair_min.cli', 'eval', '--pretrained', 'x.pt', '--dataset', 'coco',
                          '--root', str(tmp_path), '--output', str(tmp_path / 'e.json')],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.startswith('flair-min eval: error: annotation file not found')
    assert 'Traceback' not in run.stderr


def test_argparse_errors_are_one_line_too(capsys):
    code, _, err = run_main(['train'], capsys)
    assert code == 2 and 'flair-min train: error: the following arguments are required: --data' in err


# 2. eval: the checkpoint's stored config; a warning when the shapes are all there is; --model as train's

def load_for_eval(model, path, device):
    "What `flair-min eval` and `visualize` load: `--model` (or None) and `--pretrained`, through the one loader."
    return cli._load_model(argparse.Namespace(model=model, pretrained=str(path), device=device))

def test_stored_config_gives_the_original_logits(checkpoints):
    tmp, model = checkpoints
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        loaded = load_for_eval(None, tmp / 'run.pt', 'cpu')[0]
    assert caught == []   # nothing guessed
    assert (loaded.config.vision_heads, loaded.config.text_heads) == (4, 4)
    torch.testing.assert_close(logits(loaded), logits(model))


def test_without_config_the_shapes_are_read_with_a_warning(checkpoints):
    tmp, model = checkpoints
    with pytest.warns(UserWarning, match=r'stores no model config.*assuming width / 64 attention heads \(2 vision, '
                                         r'2 text\) and 8 pooling heads.*--model'):
        guessed = load_for_eval(None, tmp / 'weights.pt', 'cpu')[0]
    assert not torch.allclose(logits(guessed), logits(model), atol=1e-4)   # the misread: other heads, other logits


@pytest.mark.parametrize('spec', ['inline', 'file'])
def test_eval_model_takes_train_specs(checkpoints, tmp_path, spec):
    tmp, model = checkpoints
    (tmp_path / 'four_heads.json').write_text(json.dumps(FOUR_HEADS))
    given = json.dumps(FOUR_HEADS) if spec == 'inline' else str(tmp_path / 'four_heads.json')
    torch.testing.assert_close(logits(load_for_eval(given, tmp / 'weights.pt', 'cpu')[0]), logits(model))


def test_eval_end_to_end_with_a_run_checkpoint(checkpoints, tmp_path, capsys):
    tmp, _ = checkpoints
    argv = ['eval', '--pretrained', str(tmp / 'run.pt'), '--dataset', 'coco', '--root', str(tiny_coco(tmp_path / 'c')),
            '--workers', '0', '--batch-size', '2', '--device', 'cpu', '--output', str(tmp_path / 'new' / 'r.json')]
    code, out, _ = run_main(argv, capsys)
    assert code == 0 and 'text→image' in out
    assert out.index('text→image') < out.index(f"wrote {tmp_path / 'new' / 'r.json'}")   # the table first
    assert json.loads((tmp_path / 'new' / 'r.json').read_text())['num_images'] == 3


# 3. train --out that cannot be a folder: refused before anything is built

def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / 'taken').write_text('a file')
    code, _, err = run_main(train_argv(tmp_path / 'taken'), capsys)
    assert code == 2 and f'flair-min train: error: --out: {tmp_path}/taken is a file; expected a folder' in err
    code, _, err = run_main(train_argv(tmp_path / 'taken' / 'run'), capsys)
    assert code == 2 and '--out: cannot write in' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']


# 4. eval --output: its folder made or refused first; the table printed before the file is written

def test_eval_output_folder_is_checked_before_the_work(tmp_path, capsys):
    (tmp_path / 'taken').write_text('a file')
    for dataset in ('coco', 'voc20'):   # the retrieval and the segmentation paths
        argv = ['eval', '--pretrained', 'missing.pt', '--dataset', dataset, '--root', str(tmp_path / 'missing'),
                '--output', str(tmp_path / 'taken' / 'r.json')]
        code, _, err = run_main(argv, capsys)
        assert code == 2 and f"--output {tmp_path}/taken/r.json: {tmp_path}/taken is a file" in err, err
    code, _, err = run_main(argv[:-1] + [str(tmp_path)], capsys)
    assert code == 2 and 'is a folder; expected a file name' in err


def test_segmentation_output_in_a_new_folder(checkpoints, tmp_path, capsys):
    tmp, _ = checkpoints
    output = tmp_path / 'results' / 'voc' / 'voc20.json'
    argv = ['eval', '--pretrained', str(tmp / 'run.pt'), '--dataset', 'voc20', '--root', str(tiny_voc(tmp_path / 'v')),
            '--device', 'cpu', '--output', str(output)]
    code, out, _ = run_main(argv, capsys)
    assert code == 0 and out.index('mIoU') < out.index(f'wrote {output}')
    assert 'mIoU' in json.loads(output.read_text())['metrics']


def test_table_is_printed_even_when_writing_fails(checkpoints, tmp_path, capsys, monkeypatch):
    tmp, _ = checkpoints
    argv = ['eval', '--pretrained', str(tmp / 'run.pt'), '--dataset', 'coco', '--root', str(tiny_coco(tmp_path / 'c')),
            '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'r.json')]
    def refuse(self, *args, **kwargs): raise PermissionError(f'{self}: disk went read-only')
    monkeypatch.setattr(cli.Path, 'write_text', refuse)
    code, out, err = run_main(argv, capsys)
    assert code == 2 and 'text→image' in out and 'disk went read-only' in err


# 5. the model's vocabulary against the tokenizer, before anything runs

def test_train_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path, capsys):
    code, _, err = run_main(train_argv(tmp_path / 'run', model='tiny'), capsys)
    assert code == 2 and err.startswith("flair-min train: error: --model: texts: got token id 49407, but the model's "
                                        "vocabulary has 1000 entries")
    assert 'use a model with the CLIP vocabulary (49,408)' in err
    assert not (tmp_path / 'run').exists()   # the toy data was not written


# 6. counts and sizes checked as they are parsed

@pytest.mark.parametrize('argv,option,expected', [
    (['train', '--data', 'toy', '--num-captions', '0'], '--num-captions', 'an integer >= 1, got 0'),
    (['train', '--data', 'toy', '--batch-size', '0'], '--batch-size', 'an integer >= 1, got 0'),
    (['train', '--data', 'toy', '--workers', '-1'], '--workers', 'an integer >= 0, got -1'),
    (['train', '--data', 'toy', '--steps', '0'], '--steps', 'an integer >= 1, got 0'),
    (['train', '--data', 'toy', '--epochs', '0'], '--epochs', 'a number > 0, got 0'),
    (['train', '--data', 'toy', '--accum-steps', 'two'], '--accum-steps', "an integer, got 'two'"),
    (['train', '--data', 'toy', '--max-merged', '0'], '--max-merged', 'an integer >= 1, got 0'),
    (['eval', '--pretrained', 'x', '--dataset', 'coco', '--root', '.', '--batch-size', '0'], '--batch-size',
     'an integer >= 1, got 0'),
    (['eval', '--pretrained', 'x', '--dataset', 'coco', '--root', '.', '--topk', '0'], '--topk',
     'an integer >= 1, got 0'),
    (['eval', '--pretrained', 'x', '--dataset', 'coco', '--root', '.', '--chunk-size', '0'], '--chunk-size',
     'an integer >= 1, got 0'),
    (['demo', '--num-captions', '0'], '--num-captions', 'an integer >= 1, got 0'),
    (['visualize', '--pretrained', 'x', '--image', 'x', '--text', 'x', '--head', '-1'], '--head',
     'an integer >= 0, got -1'),
    (['captions', '--k', '0'], '--k', 'an integer >= 1, got 0'),
])
def test_counts_are_checked_when_parsed(argv, option, expected, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2 and f'flair-min {argv[0]}: error: argument {option}: expected {expected}' in err


# 8. the data's skip report, by kind, at the end of training

@pytest.mark.skipif(not BAD_SHARD.exists(), reason='data/toy/bad-samples.tar is not there')
def test_train_prints_the_skip_report_by_kind(tmp_path, capsys):
    code, out, _ = run_main(train_argv(tmp_path / 'run', data=BAD_SHARD), capsys)
    data_line = next(line for line in out.splitlines() if line.startswith('data: '))
    assert code == 0 and data_line.startswith('data: kept ')
    for kind in ('no_image', 'corrupt_image', 'bad_json', 'no_caption', 'empty_caption'): assert kind in data_line


def test_a_run_checkpoint_stores_the_flair_config(checkpoints):
    stored = torch.load(checkpoints[0] / 'run.pt', weights_only=True)['config']
    assert FlairConfig(**stored) == FlairConfig.resolve(FOUR_HEADS)


# 9. a run folder that holds another run is not overwritten; the toy data follows --toy-samples

def test_train_refuses_a_folder_that_holds_another_run(tmp_path, capsys):
    out = tmp_path / 'run'
    assert run_main(train_argv(out), capsys)[0] == 0
    first = (out / 'checkpoints' / 'latest.pt').read_bytes()
    code, _, err = run_main(train_argv(out, model=json.dumps(FOUR_HEADS)), capsys)
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert (f'flair-min train: error: --out {out} holds another run (checkpoints/latest.pt, history.json): continue '
            'it with --resume latest, replace it with --overwrite, or choose another --out') in err
    assert (out / 'checkpoints' / 'latest.pt').read_bytes() == first
    (out / 'checkpoints' / 'latest.pt').unlink()                 # the history alone marks a run too
    assert 'holds another run (history.json)' in run_main(train_argv(out, model=json.dumps(FOUR_HEADS)), capsys)[2]
    code, _, _ = run_main(train_argv(out, '--overwrite', model=json.dumps(FOUR_HEADS)), capsys)
    assert code == 0 and torch.load(out / 'checkpoints' / 'latest.pt', weights_only=True)['config']['vision_heads'] == 4
    assert json.loads((out / 'history.json').read_text())['step'] == [1, 2]              # the new run's history
    assert run_main(train_argv(out, '--resume', 'latest', '--steps', '3', model=json.dumps(FOUR_HEADS)), capsys)[0] == 0


def scenes_in(pattern) -> int:
    "The samples (one .json each) in the shards matching `pattern`."
    import glob, tarfile
    return sum(sum(m.name.endswith('.json') for m in tarfile.open(p).getmembers()) for p in glob.glob(pattern))


def test_toy_data_follows_toy_samples(tmp_path):
    assert scenes_in(cli.toy_shards(tmp_path, 16)) == 16
    assert scenes_in(cli.toy_shards(tmp_path, 8)) == 8            # not the 16 written first
    assert scenes_in(cli.toy_shards(tmp_path, 16)) == 16


# 10. demo: the output folders are checked before any training

@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs): raise AssertionError('trained before the output folders were checked')
    import flair_min.demo
    monkeypatch.setattr(flair_min.demo, 'train_demo_model', refuse)


DEMO = ['demo', '--quick', '--steps', '1', '--train-scenes', '16', '--eval-scenes', '8', '--batch-size', '4',
        '--threads', '1', '--quiet', '--no-plots']


def test_demo_results_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / 'taken').write_text('a file')
    code, _, err = run_main([*DEMO, '--ablate', '--out', str(tmp_path / 'demo'), '--results', str(tmp_path / 'taken')],
                            capsys)
    assert code == 2 and err == (f'flair-min demo: error: --results: {tmp_path}/taken is a file; expected a folder to '
                                 'write into (an existing one, or a path where one can be made)\n')
    assert not (tmp_path / 'demo').exists()                        # no toy world written either


@pytest.mark.parametrize('ablate', [[], ['--ablate']])
def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys, no_training, ablate):
    (tmp_path / 'taken').write_text('a file')
    code, _, err = run_main([*DEMO, *ablate, '--out', str(tmp_path / 'taken'), '--results', str(tmp_path / 'r')],
                            capsys)
    assert code == 2 and err.startswith(f'flair-min demo: error: --out: {tmp_path}/taken is a file; expected a folder')
    assert err.count('\n') == 1


# 11. --model: every field checked, and the errors say where the config came from

@pytest.mark.parametrize('fields, expected', [
    ({'patch_size': 0}, 'patch_size=0: expected an int >= 1'),
    ({'vision_heads': 0}, 'vision_heads=0: expected an int >= 1'),
    ({'text_layers': 0}, 'text_layers=0: expected an int >= 1'),
    ({'vocab_size': 'big'}, "vocab_size='big': expected an int >= 1"),
    ({'vision_layers': -1}, 'vision_layers=-1: expected an int >= 1'),
    ({'mlp_ratio': 0}, 'mlp_ratio=0: expected a finite number > 0'),
])
def test_bad_model_field_is_one_line_naming_the_option(tmp_path, capsys, fields, expected):
    code, _, err = run_main(train_argv(tmp_path / 'run', model=json.dumps({**TINY_CLIP, **fields})), capsys)
    assert code == 2 and err == f'flair-min train: error: --model: {expected}\n'
    assert not (tmp_path / 'run').exists()


def test_model_json_syntax_error_names_the_option(tmp_path, capsys):
    code, _, err = run_main(train_argv(tmp_path / 'run', model='{"preset": "tiny", "vocab_size": 49408'), capsys)
    assert code == 2 and err.startswith("flair-min train: error: --model: not valid JSON (Expecting ',' delimiter")


def test_bad_stored_config_names_the_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    config = FlairConfig.resolve(TINY_CLIP)
    bad = {**vars(config), 'patch_size': 0}
    torch.save({'state_dict': FLAIR(config).state_dict(), 'config': bad}, tmp_path / 'bad.pt')
    argv = ['eval', '--pretrained', str(tmp_path / 'bad.pt'), '--dataset', 'coco', '--root',
            str(tiny_coco(tmp_path / 'c')), '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'r.json')]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err == (f"flair-min eval: error: the model config stored in {tmp_path / 'bad.pt'}: "
                                 "patch_size=0: expected an int >= 1\n")


# 12. one line for every error of the user or the environment; the exit status says which

@pytest.mark.parametrize('job', [
    ['train', '--data', 'toy'], ['eval', '--pretrained', 'x', '--dataset', 'coco', '--root', '.'],
    ['visualize', '--pretrained', 'x', '--image', 'x', '--text', 'x']])
def test_unknown_device_is_refused_when_parsed(capsys, job):
    code, _, err = run_main([*job, '--device', 'banana'], capsys)
    assert code == 2 and err.splitlines()[-1] == (f"flair-min {job[0]}: error: argument --device: expected a device "
                                                  "like cpu, cuda or cuda:1, got 'banana'")


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
@pytest.mark.parametrize('job', [
    ['train', '--data', 'toy'], ['eval', '--pretrained', 'x', '--dataset', 'coco', '--root', '.']])
def test_cuda_without_a_gpu_is_refused_when_parsed(capsys, job):
    code, _, err = run_main([*job, '--device', 'cuda'], capsys)
    assert code == 2 and err.splitlines()[-1] == (f"flair-min {job[0]}: error: argument --device: 'cuda' asks for "
                                                  "a GPU, but torch sees none (torch.cuda.is_available() is False); "
                                                  "expected cpu")


def test_hub_out_of_reach_is_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    def no_network(**kwargs): raise OSError('Name or service not known')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    monkeypatch.chdir(tmp_path)                                   # the released name is no local file here
    argv = ['eval', '--pretrained', 'flair-cc3m-recap.pt', '--dataset', 'coco', '--root',
            str(tiny_coco(tmp_path / 'c')), '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'r.json')]
    code, _, err = run_main(argv, capsys)
    assert code == 1 and err.count('\n') == 1 and err.startswith("flair-min eval: error: could not fetch")
    assert 'pass its local path' in err
    with pytest.raises(ConnectionError): main([*argv, '--debug'])


def test_an_unwritable_file_is_one_line_naming_it(checkpoints, tmp_path, capsys, monkeypatch):
    import errno
    tmp, _ = checkpoints
    argv = ['eval', '--pretrained', str(tmp / 'run.pt'), '--dataset', 'coco', '--root', str(tiny_coco(tmp_path / 'c')),
            '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'r.json')]
    def full(self, *args, **kwargs): raise OSError(errno.ENOSPC, 'No space left on device', str(self))
    monkeypatch.setattr(cli.Path, 'write_text', full)
    code, _, err = run_main(argv, capsys)
    assert code == 1 and err.endswith(f"\nflair-min eval: error: No space left on device: {tmp_path / 'r.json'}\n")
    assert 'Traceback' not in err
    with pytest.raises(OSError, match='No space left'): main([*argv, '--debug'])


def test_interrupted_training_exits_quietly_with_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    import signal
    from flair_min.train import Interrupted
    for signum in (signal.SIGINT, signal.SIGTERM):
        def stop(self, *args, **kwargs): raise Interrupted(signum)
        monkeypatch.setattr(cli.Trainer, 'fit', stop)
        code, _, err = run_main(train_argv(tmp_path / f'run{signum}'), capsys)
        assert (code, err) == (128 + signum, '')
        with pytest.raises(Interrupted): main([*train_argv(tmp_path / f'debug{signum}'), '--debug'])


def test_ctrl_c_elsewhere_is_one_line(monkeypatch, capsys):
    def ctrl_c(args): raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'run_demo_command', ctrl_c)
    code, _, err = run_main(['demo'], capsys)
    assert (code, err) == (130, 'flair-min demo: interrupted\n')


@pytest.mark.parametrize('signame', ['SIGINT', 'SIGTERM'])
def test_a_signal_during_training_saves_and_exits_without_a_traceback(tmp_path, signame):
    "The real thing: flair-min train in a process of its own, stopped by a signal once its progress bar shows a step."
    import re, signal, threading, time
    argv = [a for a in train_argv(tmp_path / 'run') if a != '--no-progress']
    argv[argv.index('--steps') + 1] = '100000'
    proc = subprocess.Popen([sys.executable, '-m', 'flair_min.cli', *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []                                                      # the progress bar writes to stderr, '\r' by '\r'
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), '')), daemon=True)
    reader.start()
    for _ in range(6000):                                         # a finished step: fit and its signal handlers run
        if re.search(r'\b[1-9]\d*/100000', ''.join(err)) or proc.poll() is not None: break
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signame))
    proc.wait(timeout=600)
    reader.join(timeout=60)
    out = proc.stdout.read()                                      # a few lines: the pipe never filled
    err = ''.join(err)
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert 'Traceback' not in err and 'saved' in out + err
    assert (tmp_path / 'run' / 'checkpoints' / 'latest.pt').exists()


# 13. smaller silent errors: refused before the work

def test_steps_and_epochs_together_are_refused(tmp_path, capsys):
    code, _, err = run_main(train_argv(tmp_path / 'run', '--epochs', '2'), capsys)
    assert code == 2 and err == ('flair-min train: error: --steps and --epochs both set the length of the run; '
                                 'expected one of them\n')
    assert not (tmp_path / 'run').exists()


def test_retrieval_on_a_segmentation_set_is_refused(tmp_path, capsys):
    argv = ['eval', '--task', 'retrieval', '--dataset', 'voc20', '--pretrained', 'x.pt', '--root', str(tmp_path),
            '--output', str(tmp_path / 'r.json')]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err == ("flair-min eval: error: --dataset voc20 is a segmentation set: use --task "
                                 "segmentation (or leave --task out)\n")


@pytest.mark.parametrize('argv, option', [
    (['eval', '--pretrained', 'x', '--dataset', 'voc21', '--root', '.', '--background-threshold', 'nan'],
     '--background-threshold'),
    (['train', '--data', 'toy', '--lr', 'inf'], '--lr'), (['train', '--data', 'toy', '--lr', 'nan'], '--lr'),
    (['train', '--data', 'toy', '--eps', 'nan'], '--eps'), (['train', '--data', 'toy', '--epochs', 'inf'], '--epochs'),
    (['train', '--data', 'toy', '--weight-decay', 'nan'], '--weight-decay'),
    (['train', '--data', 'toy', '--grad-clip-norm', 'inf'], '--grad-clip-norm'),
    (['train', '--data', 'toy', '--betas', '0.9', 'nan'], '--betas'),
])
def test_float_options_expect_finite_numbers(capsys, argv, option):
    code, _, err = run_main(argv, capsys)
    assert code == 2 and f'flair-min {argv[0]}: error: argument {option}: expected a finite number' in err


def test_lr_must_be_positive_when_parsed(capsys):
    code, _, err = run_main(['train', '--data', 'toy', '--lr', '0'], capsys)
    assert code == 2 and 'argument --lr: expected a number > 0, got 0' in err


def test_training_knobs_are_checked_before_the_work(tmp_path, capsys):
    "What TrainConfig refuses is refused before the toy world is written or a model is built."
    for extra, expected in ((['--betas', '0.9', '1.5'], 'betas=(0.9, 1.5): expected '),
                            (['--weight-decay', '-1'], 'weight_decay=-1.0: expected ')):
        code, _, err = run_main(train_argv(tmp_path / 'run', *extra), capsys)
        assert code == 2 and err.startswith(f'flair-min train: error: {expected}') and err.count('\n') == 1, err
        assert not (tmp_path / 'run' / 'toy-data').exists()


def test_data_options_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    "What DataConfig refuses (here a stand-in that refuses more than 64 workers) is refused before any work."
    import flair_min.recipe
    class FewWorkers(flair_min.recipe.DataConfig):
        def __post_init__(self):
            if self.num_workers > 64: raise ValueError(f'num_workers={self.num_workers}: expected at most 64')
    monkeypatch.setattr(flair_min.recipe, 'DataConfig', FewWorkers)   # the run builder makes the DataConfig
    code, _, err = run_main(train_argv(tmp_path / 'run', '--workers', '65'), capsys)
    assert (code, err) == (2, 'flair-min train: error: num_workers=65: expected at most 64\n')
    assert not (tmp_path / 'run').exists()


def test_more_than_64_workers_is_a_valid_request():
    "The data loader counts samples per worker in a table sized to the workers asked for (tests/test_data.py runs 65)."
    from flair_min.data import DataConfig
    args = cli.build_parser().parse_args(["train", "--data", "toy", "--workers", "65"])
    assert args.workers == 65 and DataConfig(num_workers=args.workers).num_workers == 65


# 14. training that diverges: one line, status 1

def test_diverging_training_is_one_line_with_status_1(tmp_path, capsys):
    from flair_min.train import TrainingDiverged
    code, _, err = run_main(train_argv(tmp_path / 'run', '--lr', '1e9'), capsys)
    assert code == 1 and err.count('\n') == 1 and err.startswith('flair-min train: error: loss became nan'), err
    assert 'training diverged' in err and 'Traceback' not in err
    with pytest.raises(TrainingDiverged): main([*train_argv(tmp_path / 'debug', '--lr', '1e9'), '--debug'])


def test_training_from_weights_that_are_not_finite_is_refused(tmp_path, capsys):
    model = FLAIR(FlairConfig.resolve(TINY_CLIP))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights['logit_bias'] = torch.tensor(float('nan'))
    torch.save(weights, tmp_path / 'nan.pt')
    code, _, err = run_main(train_argv(tmp_path / 'run', '--pretrained', str(tmp_path / 'nan.pt')), capsys)
    assert code == 2 and err.count('\n') == 1 and 'logit_bias' in err, err
