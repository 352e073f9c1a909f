"""Reading and writing checkpoint files (nbs/03_checkpoint.ipynb) under bad input: files that hold code or Python
objects in both of torch.save's formats and as raw pickles (refused, never run, and never with advice to load them
unsafely), corrupt training checkpoints, weights that hold NaN or infinity, a failed download, a symlink planted where
a file is written, and the temporary files that a killed write leaves behind."""
import argparse, os, pickle, subprocess, warnings

import pytest
import torch

from flair_min.checkpoint import (file_format, read_checkpoint, refused_global, remove_stale_temporaries,
                                  save_checkpoint, unwrap_state_dict)
from flair_min.model import FLAIR, FlairConfig
from flair_min.pretrained import create_model

FORMATS = {'zip': {}, 'legacy': {'_use_new_zipfile_serialization': False}}


class RunsCode:
    "A malicious payload: unpickling it calls os.system, which would create `marker`."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


class RunsEval:
    "A payload through a builtin, which torch names bare (GLOBAL eval)."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize('fmt', list(FORMATS))
@pytest.mark.parametrize('payload', [RunsCode, RunsEval])
def test_a_file_that_holds_code_is_refused_and_never_run(flair_tiny, tmp_path, fmt, payload):
    marker, path = tmp_path / 'code_was_run', tmp_path / 'malicious.pt'
    torch.save({'state_dict': flair_tiny['state_dict'], 'x': payload(marker)}, path, **FORMATS[fmt])
    assert file_format(path) == fmt
    for load in (read_checkpoint, lambda p: create_model('tiny', pretrained=p), lambda p: create_model(pretrained=p)):
        with pytest.raises(ValueError) as e:
            load(path)
        message = str(e.value)
        assert f'{path} holds code: unpickling it would call' in message and 'nothing in it was run' in message
        assert 'truncated' not in message and 'weights_only=False' not in message
    assert not marker.exists()


@pytest.mark.parametrize('fmt', list(FORMATS))
def test_a_file_that_holds_python_objects_is_refused_with_a_way_out(flair_tiny, tmp_path, fmt):
    path = tmp_path / 'objects.pt'
    torch.save({'state_dict': flair_tiny['state_dict'], 'args': argparse.Namespace(lr=5e-4)}, path, **FORMATS[fmt])
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert 'refused to unpickle' in message and 'Python objects (argparse.Namespace)' in message
    assert 'weights_only=False' in message


def test_the_refused_global_is_read_off_what_torch_says(tmp_path):
    torch.save({'x': RunsCode(tmp_path / 'm')}, tmp_path / 'a.pt')
    with pytest.raises(Exception) as e:
        torch.load(tmp_path / 'a.pt', weights_only=True)
    assert refused_global(e.value) in ('posix.system', 'nt.system', 'os.system')
    assert refused_global(ValueError('PytorchStreamReader failed reading zip archive')) is None


@pytest.mark.parametrize('fmt', list(FORMATS))
def test_legacy_and_zip_files_read_and_truncated_ones_are_named(flair_tiny, tmp_path, fmt):
    path = tmp_path / 'good.pt'
    torch.save(flair_tiny['state_dict'], path, **FORMATS[fmt])
    assert list(read_checkpoint(path)) == list(flair_tiny['state_dict'])
    (tmp_path / 'cut.pt').write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match='cut.pt looks truncated or corrupted'):
        read_checkpoint(tmp_path / 'cut.pt')


def test_one_reader_returns_what_was_saved(flair_tiny, tmp_path):
    "A training checkpoint reads back whole (on the CPU unless map_location says otherwise); a bare one as it is."
    prefixed = {'module.' + k: v for k, v in flair_tiny['state_dict'].items()}
    saved = {'step': 3, 'config': {'preset': 'tiny'}, 'state_dict': prefixed}
    path = save_checkpoint(saved, tmp_path / 'latest.pt')
    checkpoint = read_checkpoint(path, map_location='cpu')
    assert (checkpoint['step'], checkpoint['config']) == (3, {'preset': 'tiny'})
    assert list(unwrap_state_dict(checkpoint)) == list(flair_tiny['state_dict'])
    meta = read_checkpoint(path, map_location='meta')['state_dict']
    assert all(v.is_meta for v in meta.values())
    torch.save(flair_tiny['state_dict'], tmp_path / 'bare.pt')
    assert list(read_checkpoint(tmp_path / 'bare.pt')) == list(flair_tiny['state_dict'])


def test_a_corrupt_training_checkpoint_says_what_to_do(tmp_path):
    latest = save_checkpoint({'step': 3, 'w': torch.zeros(1000)}, tmp_path / 'latest.pt')
    latest.write_bytes(latest.read_bytes()[:200])
    with pytest.raises(ValueError) as e:
        read_checkpoint(latest)
    assert f'{latest} looks truncated or corrupted' in str(e.value)
    assert 'delete it to start afresh, or resume from another checkpoint' in str(e.value)
    assert 'download or copy it again' in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'page.pt').write_text('<html>not a checkpoint</html>')
    with pytest.raises(ValueError, match='page.pt is not a PyTorch checkpoint'):
        read_checkpoint(tmp_path / 'page.pt')
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        read_checkpoint(tmp_path / 'missing.pt')


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    finished = subprocess.Popen(['true'])
    finished.wait()
    names = {'dead': f'.latest.pt.{finished.pid}.tmp', 'dead_step': f'.step_00000002.pt.{finished.pid}.tmp',
             'live': f'.latest.pt.{os.getpid()}.tmp', 'no_pid': '.latest.pt.tmp', 'plain': 'latest.pt'}
    for name in names.values(): (tmp_path / name).write_bytes(b'x')
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names['dead'], names['dead_step']])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names['live'], names['no_pid'], names['plain']])
    assert remove_stale_temporaries(tmp_path) == []


@pytest.mark.parametrize('payload', [RunsCode, RunsEval])
def test_a_raw_pickle_that_holds_code_is_refused_without_torchs_advice(tmp_path, payload):
    "A plain pickle (not torch.save's format) that calls code: named as code, never 'retry with weights_only=False'."
    marker, path = tmp_path / 'code_was_run', tmp_path / 'raw.pkl'
    with open(path, 'wb') as f: pickle.dump({'x': payload(marker)}, f, protocol=2)
    for load in (read_checkpoint, lambda p: create_model(pretrained=p)):
        with pytest.raises(ValueError) as e:
            load(path)
        message = str(e.value)
        assert f'{path} holds code: unpickling it would call' in message and 'nothing in it was run' in message
        assert 'weights_only=False' not in message and 'set to `False`' not in message and '\n' not in message
    assert not marker.exists()


@pytest.mark.filterwarnings('ignore:Detected pickle protocol 4')
@pytest.mark.parametrize('obj', [{'x': RunsCode('never')}, {'a': 1}])
def test_torchs_advice_is_dropped_from_what_torch_said(tmp_path, obj):
    "A pickle torch cannot even read (protocol 4): torch's own words are quoted, on one line, without its advice."
    path = tmp_path / 'raw4.pkl'
    with open(path, 'wb') as f: pickle.dump(obj, f, protocol=4)
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f'{path} is not a PyTorch checkpoint') and 'Unsupported operand' in message
    for advice in ('weights_only', 'trusted source', 'file an issue', '\n'): assert advice not in message


def test_nonfinite_weights_warn_or_raise(flair_tiny, tmp_path):
    from flair_min.checkpoint import load_checkpoint
    state_dict = dict(flair_tiny['state_dict'])
    second = list(state_dict)[5]
    state_dict['logit_scale'] = torch.tensor(float('nan'))
    state_dict[second] = torch.full_like(state_dict[second], float('inf'))
    path = tmp_path / 'diverged.pt'
    torch.save({'state_dict': state_dict}, path)
    with pytest.warns(UserWarning, match=f'{path} holds NaN or infinite values in 2 of') as caught:
        load_checkpoint(FLAIR(FlairConfig.tiny()), path)
    assert 'logit_scale' in str(caught[0].message) and second in str(caught[0].message)
    with pytest.raises(ValueError) as e:
        load_checkpoint(FLAIR(FlairConfig.tiny()), path, nonfinite='raise')
    assert str(e.value) == str(caught[0].message) and '\n' not in str(e.value)
    with pytest.raises(ValueError, match='the state dict holds NaN or infinite values'):
        load_checkpoint(FLAIR(FlairConfig.tiny()), state_dict, nonfinite='raise')
    with pytest.raises(ValueError, match="nonfinite='ignore': expected 'warn' or 'raise'"):
        load_checkpoint(FLAIR(FlairConfig.tiny()), flair_tiny['state_dict'], nonfinite='ignore')
    with warnings.catch_warnings():
        warnings.simplefilter('error')                          # finite weights: not a word
        load_checkpoint(FLAIR(FlairConfig.tiny()), flair_tiny['state_dict'], nonfinite='raise')


def test_a_failed_download_is_a_connection_error_on_one_line(monkeypatch):
    import huggingface_hub
    from flair_min.checkpoint import download_weights_from_hf
    def no_network(**kwargs): raise OSError('Name or service not known\n(after 5 retries)')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    with pytest.raises(ConnectionError) as e:
        download_weights_from_hf(filename='flair-merged30m.pt')
    assert 'pass its local path' in str(e.value) and '\n' not in str(e.value)


def test_atomic_write_replaces_a_planted_symlink_not_its_target(tmp_path):
    from flair_min.checkpoint import atomic_write, temporary_path
    target = tmp_path / 'precious.txt'
    target.write_text('keep me')
    run = tmp_path / 'run'
    run.mkdir()
    link = run / 'history.json'
    link.symlink_to(target)
    atomic_write(link, lambda f: f.write(b'{}'))
    assert target.read_text() == 'keep me' and not link.is_symlink() and link.read_bytes() == b'{}'
    temporary_path(link).symlink_to(target)                    # one planted where the temporary file goes
    atomic_write(link, lambda f: f.write(b'[]'))
    assert target.read_text() == 'keep me' and link.read_bytes() == b'[]'
    def dies(f):
        f.write(b'half'); raise RuntimeError('killed mid-write')
    with pytest.raises(RuntimeError, match='killed mid-write'):
        atomic_write(link, dies)
    assert link.read_bytes() == b'[]' and [p.name for p in run.iterdir()] == ['history.json']
