"""`flair-min` on bad input: one-line errors with exit status 2 (tracebacks with --debug and for bugs), options checked
as they are parsed, output folders checked before the work, the model's vocabulary checked against the tokenizer, the
stored config of a checkpoint used for evaluation, and the data's skip report at the end of training."""
import json, subprocess, sys, warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import flair_min.cli as cli
from flair_min.cli import load_for_eval, main
from flair_min.checkpoint import StateDictMismatchError, save_checkpoint
from flair_min.model import FLAIR, FlairConfig
from flair_min.tokenizer import get_tokenizer
from flair_min.train import TrainConfig, Trainer

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
    assert code == 2 and 'vocab_size=1000' in err
    assert '''use a config with vocab_size 49408, e.g. --model '{"preset": "tiny", "vocab_size": 49408}''' in err
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
