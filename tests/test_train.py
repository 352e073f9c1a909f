"""Properties of the training loop (nbs/08_train.ipynb) beyond the notebook's own checks: exact accumulation
through the optimizer, exact resume with accumulation across an epoch boundary, atomic checkpoints under a
failing write, the released-weights loader, CPU precision, the 'mps' baseline, optional TensorBoard, two gloo
processes against one, and the `flair-min train` entry point on toy-world shards; and bad input: knobs out of
range, a resume with another length, Ctrl-C, an unwritable out_dir, a corrupt latest.pt, stale temporaries."""
import argparse, contextlib, math, os, signal, socket, subprocess, time, warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import ROOT
from flair_min.data import make_train_loader
from flair_min.model import FLAIR, FlairConfig
from flair_min import train as T
from flair_min.cli import add_train_arguments, run_train, total_steps
from flair_min.model import autocast
from flair_min.losses import make_loss
from ddp_train_worker import RUNS, global_batches, micro_batches, train_run


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def tiny_trainer(**knobs):
    torch.manual_seed(knobs.pop('init_seed', 0))
    return T.Trainer(FLAIR(FlairConfig.tiny()),
                     T.TrainConfig(**{'steps': 4, 'warmup': 1, 'lr': 1e-3, 'progress': False, **knobs}))


class Captioned(Dataset):
    "Random images with K token rows drawn per item from a pool of 5, using the global generator (data randomness)."
    def __init__(self, n=10, k=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images, self.pool, self.k = (torch.randn(n, 3, 32, 32, generator=g),
                                          torch.randint(1, 1000, (n, 5, 16), generator=g), k)
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        return self.images[i] + 0.1 * torch.randn(3, 32, 32), self.pool[i, torch.randint(0, 5, (self.k,))]


def test_param_groups_follow_the_official_rule():
    model = FLAIR(FlairConfig.tiny())
    no_decay, decay = T.param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in decay['params']:
        assert p.ndim >= 2 and not any(s in names[id(p)] for s in ('ln', 'bias', 'logit_scale'))
    for p in no_decay['params']:
        assert p.ndim < 2 or any(s in names[id(p)] for s in ('ln', 'bias', 'logit_scale'))
    assert (no_decay['weight_decay'], decay['weight_decay']) == (0.0, 0.5)
    assert len(no_decay['params']) + len(decay['params']) == len(list(model.parameters()))


def test_schedule_is_warmup_then_cosine():
    trainer = tiny_trainer(steps=20, warmup=5, lr=2.0)
    lrs = []
    for _ in range(20):
        lrs.append(trainer.optimizer.param_groups[1]['lr']); trainer.optimizer.step(); trainer.scheduler.step()
    expected = [2.0 * (s + 1) / 5 if s < 5 else 1.0 * (1 + math.cos(math.pi * (s - 5) / 15)) for s in range(20)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_accumulation_equals_one_big_step_through_the_optimizer():
    # eps=1e-4: some gradients are zero in exact arithmetic (a key bias cannot change a softmax), and with the
    # recipe's eps=1e-8 Adam would turn their round-off into full-size updates of random sign
    batches = global_batches(steps=2, batch_size=4, num_captions=3)
    big, small = tiny_trainer(steps=2, eps=1e-4), tiny_trainer(steps=2, accum_steps=2, eps=1e-4)
    h_big = big.fit(batches)
    h_small = small.fit([(im[s], tx[s]) for im, tx in batches for s in (slice(0, 2), slice(2, 4))])
    assert h_small['loss'] == pytest.approx(h_big['loss'], abs=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_is_exact_with_accumulation_across_epochs(tmp_path):
    loader = lambda: DataLoader(Captioned(n=10), batch_size=2, shuffle=True, drop_last=True)  # 5 batches per epoch
    straight = tiny_trainer(steps=5, accum_steps=2).fit(loader())                               # 10 batches: 2 epochs
    tiny_trainer(steps=5, accum_steps=2, out_dir=str(tmp_path), save_every=1,
                 keep_checkpoints=True).fit(loader(), until=2)
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert (checkpoint['step'], checkpoint['epoch'], checkpoint['batch']) == (2, 0, 4)
    assert (sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
            == ['latest.pt', 'step_00000001.pt', 'step_00000002.pt'])
    resumed = tiny_trainer(steps=5, accum_steps=2, out_dir=str(tmp_path), resume='latest', init_seed=7).fit(loader())
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)
    assert resumed['lr'] == straight['lr']


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer = tiny_trainer(out_dir=str(tmp_path))
    trainer.fit(global_batches(steps=1), until=1)
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    before = latest.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a checkpoint'); raise OSError('No space left on device')
    monkeypatch.setattr(T.torch, 'save', dies_half_way)
    trainer.step += 1
    with pytest.raises(OSError, match='No space left'): trainer.save()
    assert latest.read_bytes() == before
    assert [p.name for p in latest.parent.iterdir()] == ['latest.pt']     # no temporary file left behind
    assert torch.load(latest, weights_only=True)['step'] == 1


def test_checkpoint_loads_with_the_released_weights_loader(tmp_path):
    from flair_min.checkpoint import read_checkpoint
    from flair_min.pretrained import create_model_and_transforms
    trainer = tiny_trainer(out_dir=str(tmp_path))
    trainer.fit(global_batches(steps=1), until=1)
    path = tmp_path / 'checkpoints' / 'latest.pt'
    assert set(read_checkpoint(path)) == set(trainer.model.state_dict())        # weights_only=True, module. stripped
    model, _, _ = create_model_and_transforms('tiny', pretrained=path)
    for (name, p), q in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name
    assert FLAIR.from_state_dict(torch.load(path, weights_only=True)).config == FlairConfig.tiny()


def test_cpu_trains_in_fp32_even_when_mixed_precision_is_asked():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = tiny_trainer(precision='amp_bf16')
    assert trainer.precision == 'fp32' and not trainer.scaler.is_enabled()
    assert any('fp32 instead' in str(w.message) for w in caught)
    assert isinstance(autocast(trainer.precision, trainer.device), type(contextlib.nullcontext()))


def test_mps_baseline_never_touches_the_pooling_layer():
    trainer = tiny_trainer(loss='mps', steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith('visual_proj.')}
    history = trainer.fit(global_batches(steps=2))
    assert len(history['loss']) == 2 and all(math.isfinite(l) for l in history['loss'])
    for n, p in trainer.model.named_parameters():
        if n.startswith('visual_proj.'): assert torch.equal(p, before[n]), n


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    def no_tensorboard(name, *args, **kwargs):
        if name.startswith('torch.utils.tensorboard'): raise ImportError('No module named tensorboard')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    with pytest.warns(UserWarning, match='tensorboard is not installed'):
        history = tiny_trainer(steps=1, out_dir=str(tmp_path), tensorboard=True,
                               progress=True).fit(global_batches(steps=1))
    assert len(history['loss']) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path):
    "Two gloo processes (forked: no second import of torch) against one process on the concatenated batches."
    import ddp_train_worker
    context, port = torch.multiprocessing.get_context('fork'), free_port()
    workers = [context.Process(target=ddp_train_worker.spawned, args=(rank, 2, port, str(tmp_path)))
               for rank in range(2)]
    for w in workers: w.start()
    progress = lambda: [p.read_text() if p.exists() else '' for p in (tmp_path / f'rank{r}.progress' for r in range(2))]
    try:
        seen, last_change = progress(), time.monotonic()
        # a hang: no run done in 120 s
        while any(w.is_alive() for w in workers) and time.monotonic() - last_change < 120:
            next(w for w in workers if w.is_alive()).join(timeout=1)
            if any(w.exitcode not in (None, 0) for w in workers): break
            if (now := progress()) != seen: seen, last_change = now, time.monotonic()
        assert not any(w.is_alive() for w in workers), ('the two DDP processes made no progress for 120 s '
                                                        f'(last: {seen})')
        assert [w.exitcode for w in workers] == [0, 0], (f'exit codes {[w.exitcode for w in workers]}: '
                                                         'see the traceback above')
    finally:
        for w in workers:
            if w.is_alive(): w.kill(); w.join()
    ddp = torch.load(tmp_path / 'ddp.pt', weights_only=True)
    assert ddp['world'] == 2
    batches = global_batches()
    ring_losses, gather_losses = ddp['ring'][0], ddp['flair'][0]
    assert all(math.isfinite(x) for x in ring_losses) and ring_losses[0] != pytest.approx(gather_losses[0], abs=1e-4)
    for name, knobs in RUNS.items():
        # one process, whole batches, no accumulation
        losses, weights = train_run(batches, **{**knobs, 'accum_steps': 1})
        assert ddp[name][0] == pytest.approx(losses, abs=1e-5), name
        for key, value in weights.items():
            torch.testing.assert_close(ddp[name][1][key], value, atol=2e-5, rtol=1e-4, msg=f'{name} {key}')


def test_run_train_on_toy_shards(tmp_path):
    parser = add_train_arguments(argparse.ArgumentParser())
    argv = ['--data', 'toy', '--toy-samples', '16', '--model', '{"preset": "tiny", "vocab_size": 49408}',
            '--batch-size', '2', '--num-captions', '3', '--workers', '0', '--steps', '2', '--warmup', '1',
            '--accum-steps', '2', '--loss', 'mps', '--out', str(tmp_path), '--no-progress', '--save-every', '1',
            '--keep-checkpoints']
    history = run_train(parser.parse_args(argv))
    assert len(history['loss']) == 2 and all(math.isfinite(l) for l in history['loss'])
    names = {p.name for p in tmp_path.iterdir()} | {p.name for p in (tmp_path / 'checkpoints').iterdir()}
    assert {'history.json', 'loss_curve.png', 'latest.pt', 'step_00000001.pt', 'step_00000002.pt'} <= names
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['args']['loss'] == 'mps' and checkpoint['config']['vocab_size'] == 49408
    with pytest.raises(ValueError, match='--epochs'):
        total_steps(argparse.Namespace(steps=None, epochs=None, accum_steps=1), None)


@pytest.mark.skipif(not (ROOT / 'data' / 'toy' / 'toy-train-000000.tar').exists(),
                    reason='the toy world has not written data/toy yet')
def test_resume_is_exact_with_random_crops_in_persistent_workers(tmp_path):
    """Stopped in epoch 1 and resumed: persistent workers have drawn epoch 0's crops, fresh ones have not;
    the curve is the same."""
    def run(until=None, **knobs):
        # 2 shards x 12: 6 batches an epoch
        loader = make_train_loader(str(ROOT / 'data' / 'toy' / 'toy-train-*.tar'), batch_size=4, num_workers=2,
                                   image_size=32, context_length=16, num_captions=3, shuffle_buffer=4, seed=0)
        assert loader.persistent_workers and loader.dataset.pipeline.transform.transforms[0].scale == (0.9, 1.0)
        torch.manual_seed(knobs.pop('init_seed', 0))
        model = FLAIR(FlairConfig(**{**vars(FlairConfig.tiny()), 'vocab_size': 49408}))
        return T.Trainer(model, T.TrainConfig(steps=9, warmup=1, lr=1e-3, progress=False,
                                              **knobs)).fit(loader, until=until)
    straight = run()
    run(until=8, out_dir=str(tmp_path))                                            # stops at batch 2 of epoch 1
    assert torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)['epoch'] == 1
    resumed = run(out_dir=str(tmp_path), resume='latest', init_seed=7)
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)


@pytest.mark.parametrize('knob, value, expected', [
    ('grad_clip_norm', -1, 'grad_clip_norm=-1: expected a gradient norm > 0 to clip to, or None (no clipping)'),
    ('grad_clip_norm', 0, 'grad_clip_norm=0: expected a gradient norm > 0'),
    ('save_every', 0, 'save_every=0: expected a number of steps >= 1, or None'),
    ('save_every', -5, 'save_every=-5'), ('lr', 0, 'lr=0: expected a learning rate > 0'), ('lr', -1e-3, 'lr=-0.001'),
    ('lr', float('nan'), 'lr=nan'), ('eps', 0, 'eps=0: expected a number > 0'),
    ('weight_decay', -0.5, 'weight_decay=-0.5: expected a number >= 0'),
    ('betas', (0.9, 1.0), 'betas=(0.9, 1.0): expected two numbers in [0, 1)'), ('betas', (-0.1, 0.9), 'betas='),
    ('betas', (0.9,), 'betas=(0.9,)'), ('betas', 0.9, 'betas=0.9'), ('eval_every', 0, 'eval_every=0'),
    ('loss_chunk_size', 0, 'loss_chunk_size=0: expected a number of images >= 1, or None'),
    ('steps', 0, 'steps=0'), ('warmup', -1, 'warmup=-1'), ('lr', '1e-3', "lr='1e-3'")])
def test_knobs_out_of_range_are_refused(knob, value, expected):
    with pytest.raises(ValueError) as e:
        T.TrainConfig(**{knob: value})
    assert expected in str(e.value)


def test_optional_knobs_accept_none_and_their_smallest_values():
    for value in (None, 1):
        T.TrainConfig(save_every=value, eval_every=value, loss_chunk_size=value, grad_clip_norm=value)
    T.TrainConfig(weight_decay=0, betas=(0, 0.5), warmup=0)


def test_resume_with_more_steps_rebuilds_the_schedule(tmp_path):
    tiny_trainer(steps=3, warmup=1, out_dir=str(tmp_path)).fit(global_batches(steps=3))
    with pytest.warns(UserWarning, match=r'a run of 3 steps \(warm-up 1\) with steps=6.*rebuilt for 6 steps'):
        history = tiny_trainer(steps=6, warmup=1, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=6))
    assert history['step'] == [1, 2, 3, 4, 5, 6]
    assert all(lr > 0 for lr in history['lr'][3:]), history['lr']
    assert history['lr'][3:] == pytest.approx([1e-3 * T.warmup_cosine(s, 1, 6) for s in range(3, 6)], abs=1e-15)
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['scheduler']['lr_lambdas'][0] == {'warmup': 1, 'steps': 6}   # a later resume keeps it


def test_resume_with_the_same_length_says_nothing(tmp_path):
    tiny_trainer(steps=4, out_dir=str(tmp_path)).fit(global_batches(steps=4), until=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tiny_trainer(steps=4, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=4))


class CtrlCAfter:
    "The batches, with a KeyboardInterrupt (a Ctrl-C while the loader fetches data) in place of batch n."
    def __init__(self, batches, n): self.batches, self.n = batches, n
    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.n: raise KeyboardInterrupt
            yield batch


@pytest.mark.parametrize('accum_steps, n, step, batch', [(1, 2, 2, 2), (2, 3, 1, 2)])
def test_ctrl_c_in_the_loader_saves_and_resume_goes_on(tmp_path, capsys, accum_steps, n, step, batch):
    "Interrupted after n loader batches; with accumulation, in the middle of drawing a step's micro-batches."
    batches = micro_batches(global_batches(steps=4), accum_steps)
    straight = tiny_trainer(accum_steps=accum_steps).fit(batches)
    trainer = tiny_trainer(accum_steps=accum_steps, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(CtrlCAfter(batches, n))
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    checkpoint = torch.load(latest, weights_only=True)
    assert (checkpoint['step'], checkpoint['batch'], len(checkpoint['history']['loss'])) == (step, batch, step)
    assert f"interrupted after step {step}: saved {latest}; continue with resume='latest'" in capsys.readouterr().out
    resumed = tiny_trainer(accum_steps=accum_steps, out_dir=str(tmp_path), resume='latest', init_seed=7).fit(batches)
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)


def test_ctrl_c_without_out_dir_says_nothing_was_saved(capsys):
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer().fit(CtrlCAfter(global_batches(steps=4), 1))
    assert 'interrupted after step 1: nothing saved (no out_dir)' in capsys.readouterr().out


def sigint_during_step(at_call: int, times: int):
    "A FLAIR loss that sends this process `times` SIGINTs (Ctrl-C) during its `at_call`-th call."
    flair, calls = make_loss('flair', 2), []
    def loss(generator=None, **out):
        calls.append(1)
        for _ in range(times if len(calls) == at_call else 0):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)   # the handler runs here
        return flair(**out, generator=generator)
    return loss


@pytest.fixture
def default_sigint():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler of someone else's here")
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the trainer gave it back


def test_ctrl_c_during_a_step_finishes_the_step_then_saves(tmp_path, capsys, default_sigint):
    trainer = tiny_trainer(out_dir=str(tmp_path), loss=sigint_during_step(at_call=2, times=1))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(global_batches(steps=4))
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['step'] == 2 and len(checkpoint['history']['loss']) == 2 and checkpoint['batch'] == 2
    out = capsys.readouterr().out
    assert 'Ctrl-C: finishing this step' in out and 'interrupted after step 2: saved' in out


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, capsys, default_sigint):
    trainer = tiny_trainer(out_dir=str(tmp_path), loss=sigint_during_step(at_call=2, times=2))
    with pytest.raises(T.UnsavedInterrupt):
        trainer.fit(global_batches(steps=4))
    assert not (tmp_path / 'checkpoints' / 'latest.pt').exists()
    assert 'stopped in the middle of a step: nothing saved' in capsys.readouterr().out


def test_out_dir_that_is_a_file_fails_when_the_trainer_is_built(tmp_path):
    (tmp_path / 'run').write_text('a file')
    with pytest.raises(NotADirectoryError, match=r"out_dir='.*run' is a file; expected a folder"):
        tiny_trainer(out_dir=str(tmp_path / 'run'))
    (tmp_path / 'run2').mkdir(); (tmp_path / 'run2' / 'checkpoints').write_text('a file where the folder goes')
    with pytest.raises(OSError, match=r"out_dir='.*run2': cannot write in .*checkpoints"):
        tiny_trainer(out_dir=str(tmp_path / 'run2'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run', 'run2']


def test_out_dir_without_write_permission_fails_when_the_trainer_is_built(tmp_path):
    locked = tmp_path / 'locked'
    locked.mkdir(); locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK): pytest.skip('permission bits are not enforced here (running as root)')
        with pytest.raises(PermissionError, match=r"out_dir='.*locked': cannot write in"):
            tiny_trainer(out_dir=str(locked))
    finally:
        locked.chmod(0o700)


def test_a_corrupt_latest_checkpoint_is_named_on_resume(tmp_path):
    tiny_trainer(steps=1, out_dir=str(tmp_path)).fit(global_batches(steps=1))
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        tiny_trainer(steps=2, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=2))
    message = str(e.value)
    assert f'{latest} looks truncated or corrupted' in message
    assert 'delete it to start afresh, or resume from another checkpoint' in message


def test_stale_temporaries_are_removed_when_a_trainer_starts(tmp_path, capsys):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    finished = subprocess.Popen(['true'])
    finished.wait()                                                   # its pid runs no more
    stale = folder / f'.latest.pt.{finished.pid}.tmp'
    live = folder / f'.step_00000001.pt.{os.getpid()}.tmp'             # a write of a running process
    unrelated = folder / 'notes.tmp'
    for path in (stale, live, unrelated): path.write_bytes(b'\0' * 1000)
    trainer = tiny_trainer(steps=1, out_dir=str(tmp_path))
    assert not stale.exists() and live.exists() and unrelated.exists()
    assert f'removed 1 temporary file(s) left in {folder}' in capsys.readouterr().out
    trainer.fit(global_batches(steps=1))
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, unrelated.name, 'latest.pt'])


def test_fused_adamw_takes_the_same_steps():
    "The fused AdamW kernel (the default) and the plain one move the weights the same way, to rounding."
    states = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = FLAIR(FlairConfig.tiny())
        # eps=1e-4: gradients that are zero in exact arithmetic (key biases) differ in round-off between the two
        # kernels, and Adam with eps=1e-8 would turn that round-off into full-size updates (as in ddp_train_worker)
        trainer = T.Trainer(model, T.TrainConfig(steps=3, warmup=1, lr=1e-3, eps=1e-4, progress=False, device='cpu',
                                                 fused_optimizer=fused))
        assert trainer.optimizer.defaults['fused'] == (fused or None)
        for batch in global_batches(steps=3): trainer.train_step([batch])
        states.append(model.state_dict())
    for name, value in states[0].items(): torch.testing.assert_close(states[1][name], value, atol=1e-5, rtol=1e-4)
