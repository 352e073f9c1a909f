"""Properties of the training loop (nbs/11_train.ipynb) beyond the notebook's own checks: exact accumulation
through the optimizer, exact resume with accumulation across an epoch boundary, atomic checkpoints under a
failing write, the released-weights loader, CPU precision, the 'mps' baseline, optional TensorBoard, two gloo
processes against one, the `flair-min train` entry point on toy-world shards, the recipes' scale and the run builder
(`build_run`: configs, epoch length against the loader's, a warning for another world size), the trainer as the one
owner of the epoch and a loss built once; and bad input: knobs out of
range or not finite, a resume with another length, learning rate, batch size or K, a resume from weights only or from
NaN weights, a loss or weights that become NaN, Ctrl-C, SIGTERM (in a real subprocess), an error in the middle of a
run, an unwritable out_dir, a corrupt latest.pt, stale temporaries, and a run folder with a planted symlink or a file
that cannot be written."""
import argparse, contextlib, dataclasses, json, math, os, re, signal, socket, subprocess, sys, time, warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import ROOT
from flair_min.data import DataConfig, make_train_loader
from flair_min.model import FLAIR, FlairConfig
from flair_min import recipe as R, train as T
from flair_min.model import autocast
from flair_min.losses import make_loss
from ddp_train_worker import RUNS, global_batches, micro_batches, train_run


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def tiny_trainer(**knobs):
    torch.manual_seed(knobs.pop('init_seed', 0))
    return T.Trainer(FLAIR(FlairConfig.tiny()),
                     R.TrainConfig(**{'steps': 4, 'warmup': 1, 'lr': 1e-3, 'progress': False, **knobs}))


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
    no_decay, decay = R.create_optimizer(model, R.TrainConfig()).param_groups
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
    from flair_min.checkpoint import read_checkpoint, unwrap_state_dict
    from flair_min.pretrained import create_model_and_transforms
    trainer = tiny_trainer(out_dir=str(tmp_path))
    trainer.fit(global_batches(steps=1), until=1)
    path = tmp_path / 'checkpoints' / 'latest.pt'
    assert set(unwrap_state_dict(read_checkpoint(path))) == set(trainer.model.state_dict())   # module. stripped
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
    from flair_min.cli import add_train_arguments, run_train
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
        return T.Trainer(model, R.TrainConfig(steps=9, warmup=1, lr=1e-3, progress=False,
                                              **knobs)).fit(loader, until=until)
    straight = run()
    run(until=8, out_dir=str(tmp_path))                                            # stops at batch 2 of epoch 1
    assert torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)['epoch'] == 1
    resumed = run(out_dir=str(tmp_path), resume='latest', init_seed=7)
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)


@pytest.mark.parametrize('knob, value, expected', [
    ('grad_clip_norm', -1, 'grad_clip_norm=-1: expected a finite number > 0, or None'),
    ('grad_clip_norm', 0, 'grad_clip_norm=0: expected a finite number > 0'),
    ('save_every', 0, 'save_every=0: expected an int >= 1, or None'),
    ('save_every', -5, 'save_every=-5'), ('lr', 0, 'lr=0: expected a finite number > 0'),
    ('lr', -1e-3, 'lr=-0.001'), ('lr', float('nan'), 'lr=nan'), ('eps', 0, 'eps=0: expected a finite number > 0'),
    ('weight_decay', -0.5, 'weight_decay=-0.5: expected a finite number >= 0'),
    ('betas', (0.9, 1.0), 'betas=(0.9, 1.0): expected two numbers in [0, 1)'), ('betas', (-0.1, 0.9), 'betas='),
    ('betas', (0.9,), 'betas=(0.9,)'), ('betas', 0.9, 'betas=0.9'), ('eval_every', 0, 'eval_every=0'),
    ('loss_chunk_size', 0, 'loss_chunk_size=0: expected an int >= 1, or None'),
    ('steps', 0, 'steps=0'), ('warmup', -1, 'warmup=-1'), ('lr', '1e-3', "lr='1e-3'"),
    ('lr', math.inf, 'lr=inf: expected a finite number > 0'), ('eps', math.inf, 'eps=inf: expected a finite'),
    ('weight_decay', math.inf, 'weight_decay=inf: expected a finite number >= 0'),
    ('grad_clip_norm', math.inf, 'grad_clip_norm=inf: expected a finite number > 0'),
    ('betas', (0.9, math.nan), 'betas=(0.9, nan)'), ('steps', math.inf, 'steps=inf'),
    ('warmup', math.inf, 'warmup=inf'), ('save_every', math.inf, 'save_every=inf'),
    ('steps', 2.5, 'steps=2.5: expected an int >= 1'), ('seed', -1, 'seed=-1: expected an int >= 0')])
def test_knobs_out_of_range_are_refused(knob, value, expected):
    with pytest.raises(ValueError) as e:
        R.TrainConfig(**{knob: value})
    assert expected in str(e.value)


def test_every_bad_knob_is_named_in_one_error():
    with pytest.raises(ValueError) as e:
        R.TrainConfig(steps=0, lr=-1, grad_clip_norm=0)
    assert str(e.value) == ('steps=0: expected an int >= 1; lr=-1: expected a finite number > 0; '
                            'grad_clip_norm=0: expected a finite number > 0, or None')


def test_optional_knobs_accept_none_and_their_smallest_values():
    for value in (None, 1):
        R.TrainConfig(save_every=value, eval_every=value, loss_chunk_size=value, grad_clip_norm=value)
    R.TrainConfig(weight_decay=0, betas=(0, 0.5), warmup=0)


def test_resume_with_more_steps_rebuilds_the_schedule(tmp_path):
    tiny_trainer(steps=3, warmup=1, out_dir=str(tmp_path)).fit(global_batches(steps=3))
    with pytest.warns(UserWarning, match=r'a run of 3 steps \(warm-up 1\) with steps=6.*rebuilt for 6 steps'):
        history = tiny_trainer(steps=6, warmup=1, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=6))
    assert history['step'] == [1, 2, 3, 4, 5, 6]
    assert all(lr > 0 for lr in history['lr'][3:]), history['lr']
    assert history['lr'][3:] == pytest.approx([1e-3 * R.WarmupCosine(1, 6)(s) for s in range(3, 6)], abs=1e-15)
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['scheduler']['lr_lambdas'][0] == {'warmup': 1, 'steps': 6}   # a later resume keeps it


def test_resume_with_the_same_length_says_nothing(tmp_path):
    tiny_trainer(steps=4, out_dir=str(tmp_path)).fit(global_batches(steps=4), until=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tiny_trainer(steps=4, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=4))


def test_resume_with_another_lr_follows_it_and_says_so(tmp_path):
    tiny_trainer(steps=4, lr=1e-3, out_dir=str(tmp_path)).fit(global_batches(steps=4), until=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        history = tiny_trainer(steps=4, lr=2e-3, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=4))
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and 'the learning rate changed from 0.001 to 0.002' in said[0], said
    assert history['lr'][2:] == pytest.approx([2e-3 * R.WarmupCosine(1, 4)(s) for s in (2, 3)], abs=1e-15)
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['scheduler']['base_lrs'] == [2e-3, 2e-3] and checkpoint['train_config']['lr'] == 2e-3
    trainer = tiny_trainer(steps=4, lr=2e-3, weight_decay=0.1, eps=1e-6, out_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r'eps changed from 1e-08 to 1e-06; the weight decay changed from 0.5 to 0.1'):
        trainer.resume('latest')
    no_decay, decay = trainer.optimizer.param_groups
    assert (no_decay['weight_decay'], decay['weight_decay'], decay['eps'], no_decay['eps']) == (0.0, 0.1, 1e-6, 1e-6)


def test_resume_with_another_batch_size_or_k_is_refused(tmp_path):
    loader = lambda batch_size, k: DataLoader(Captioned(n=16, k=k), batch_size=batch_size, shuffle=True, drop_last=True)
    tiny_trainer(steps=4, out_dir=str(tmp_path)).fit(loader(4, 2), until=2)
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    assert torch.load(latest, weights_only=True)['batch_shape'] == (4, 2)
    for batch_size, k in ((2, 2), (4, 3)):
        with pytest.raises(ValueError) as e:
            tiny_trainer(steps=4, out_dir=str(tmp_path), resume='latest').fit(loader(batch_size, k))
        assert str(e.value) == (f"this run was trained with batch size 4 and K 2; resuming with {batch_size} and {k} "
                                "would re-read a different part of the data: keep --batch-size 4 and "
                                "--num-captions 2, or start a new run")
    assert torch.load(latest, weights_only=True)['step'] == 2                   # left as it was
    assert tiny_trainer(steps=4, out_dir=str(tmp_path), resume='latest').fit(loader(4, 2))['step'] == [1, 2, 3, 4]


def test_resume_from_weights_only_says_to_use_pretrained(tmp_path, flair_tiny):
    weights, released = tmp_path / 'weights.pt', tmp_path / 'released.pt'
    torch.save(flair_tiny['state_dict'], weights)
    torch.save({'epoch': 32, 'name': 'tiny', 'state_dict': flair_tiny['state_dict'], 'optimizer': {}}, released)
    for path, what in ((weights, 'holds weights only (no optimizer state)'),
                       (released, "holds no flair_min training state (no 'scheduler', 'step', 'batch', 'history')")):
        with pytest.raises(ValueError) as e:
            tiny_trainer(resume=str(path)).fit(global_batches(steps=1))
        assert str(e.value) == (f"{path} {what}: resume continues a flair_min training run; "
                                f"to start from these weights use --pretrained {path}")


def test_resume_into_another_model_is_refused(tmp_path):
    "Same tensor shapes, other heads: the checkpoint's stored config says the model differs."
    tiny_trainer(steps=2, out_dir=str(tmp_path)).fit(global_batches(steps=2), until=1)
    other = T.Trainer(FLAIR(dataclasses.replace(FlairConfig.tiny(), vision_heads=4)),
                      R.TrainConfig(steps=2, warmup=1, lr=1e-3, progress=False, out_dir=str(tmp_path), resume='latest'))
    with pytest.raises(ValueError, match=r"model differs from this one in \['vision_heads'\]"):
        other.fit(global_batches(steps=2))


def test_resume_refuses_nonfinite_weights(tmp_path):
    tiny_trainer(steps=2, out_dir=str(tmp_path)).fit(global_batches(steps=2), until=1)
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    checkpoint = torch.load(latest, weights_only=True)
    checkpoint['state_dict']['module.logit_scale'].fill_(float('nan'))
    torch.save(checkpoint, latest)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(latest))} holds NaN or infinite values .*logit_scale"):
        tiny_trainer(steps=2, out_dir=str(tmp_path), resume='latest').fit(global_batches(steps=2))


def test_run_summary_writes_valid_json_inside_the_run_folder(tmp_path):
    history = tiny_trainer(steps=2).fit(global_batches(steps=2))
    history['eval'].append({'step': 2, 'recall@1': float('nan')})              # an evaluation that went wrong
    run, precious = tmp_path / 'run', tmp_path / 'precious.txt'
    run.mkdir()
    precious.write_text('keep me')
    (run / 'history.json').symlink_to(precious)                                 # planted links
    (run / 'loss_curve.png').symlink_to(precious)
    T.write_run_summary(run, history)
    assert precious.read_text() == 'keep me'
    assert sorted(p.name for p in run.iterdir()) == ['history.json', 'loss_curve.png']
    assert not any(p.is_symlink() for p in run.iterdir())
    saved = json.loads((run / 'history.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in JSON'))
    assert saved['loss'] == history['loss'] and saved['eval'] == [{'step': 2, 'recall@1': None}]
    (run / 'loss_curve.png').chmod(0o444)                                        # read-only: replaced, not written
    T.write_run_summary(run, history)


def test_a_summary_that_cannot_be_written_says_the_checkpoint_was_saved(tmp_path):
    history = tiny_trainer(steps=1, out_dir=str(tmp_path)).fit(global_batches(steps=1))
    (tmp_path / 'loss_curve.png').mkdir()          # a folder where the plot goes: not even root can write the file
    with pytest.raises(OSError) as e:
        T.write_run_summary(tmp_path, history)
    message = str(e.value)
    assert '\n' not in message and message.startswith(f"could not write {tmp_path / 'loss_curve.png'} (")
    assert message.endswith(f"the checkpoint was saved: {tmp_path / 'checkpoints' / 'latest.pt'}")


class RaisesAt:
    "The batches, with `error` raised in place of batch n (KeyboardInterrupt: a Ctrl-C while the loader fetches data)."
    def __init__(self, batches, n, error=KeyboardInterrupt): self.batches, self.n, self.error = batches, n, error
    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.n: raise self.error
            yield batch


@pytest.mark.parametrize('accum_steps, n, step, batch', [(1, 2, 2, 2), (2, 3, 1, 2)])
def test_ctrl_c_in_the_loader_saves_and_resume_goes_on(tmp_path, capsys, accum_steps, n, step, batch):
    "Interrupted after n loader batches; with accumulation, in the middle of drawing a step's micro-batches."
    batches = micro_batches(global_batches(steps=4), accum_steps)
    straight = tiny_trainer(accum_steps=accum_steps).fit(batches)
    trainer = tiny_trainer(accum_steps=accum_steps, out_dir=str(tmp_path))
    with pytest.raises(T.Interrupted) as e:
        trainer.fit(RaisesAt(batches, n))
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    checkpoint = torch.load(latest, weights_only=True)
    assert (checkpoint['step'], checkpoint['batch'], len(checkpoint['history']['loss'])) == (step, batch, step)
    said = f"interrupted by SIGINT after step {step}: saved {latest}; continue with resume='latest'"
    assert e.value.signum == signal.SIGINT and said in str(e.value) and said in capsys.readouterr().out
    resumed = tiny_trainer(accum_steps=accum_steps, out_dir=str(tmp_path), resume='latest', init_seed=7).fit(batches)
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)


def test_ctrl_c_without_out_dir_says_nothing_was_saved(capsys):
    with pytest.raises(T.Interrupted):
        tiny_trainer().fit(RaisesAt(global_batches(steps=4), 1))
    assert 'interrupted by SIGINT after step 1: nothing saved (no out_dir)' in capsys.readouterr().out


def signals_during_step(at_call: int, *signums):
    "A FLAIR loss that sends this process the signals `signums` (SIGINT: Ctrl-C) during its `at_call`-th call."
    flair, calls = make_loss('flair', 2), []
    def loss(generator=None, **out):
        calls.append(1)
        for signum in (signums if len(calls) == at_call else ()):
            os.kill(os.getpid(), signum)
            time.sleep(0.01)   # the handler runs here
        return flair(**out, generator=generator)
    return loss


@pytest.fixture
def default_signals():
    "SIGINT and SIGTERM with Python's default handlers, and given back so by the trainer."
    if (signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        pytest.skip("SIGINT or SIGTERM has a handler of someone else's here")
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize('signum, name', [(signal.SIGINT, 'Ctrl-C'), (signal.SIGTERM, 'SIGTERM')])
def test_a_stop_signal_during_a_step_finishes_the_step_then_saves(tmp_path, capsys, default_signals, signum, name):
    trainer = tiny_trainer(out_dir=str(tmp_path), loss=signals_during_step(2, signum))
    with pytest.raises(T.Interrupted) as e:
        trainer.fit(global_batches(steps=4))
    assert e.value.signum == signum
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['step'] == 2 and len(checkpoint['history']['loss']) == 2 and checkpoint['batch'] == 2
    out = capsys.readouterr().out
    assert f'{name}: finishing this step' in out and f'interrupted by {signum.name} after step 2: saved' in out


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, capsys, default_signals):
    trainer = tiny_trainer(out_dir=str(tmp_path), loss=signals_during_step(2, signal.SIGINT, signal.SIGINT))
    with pytest.raises(T.UnsavedInterrupt):
        trainer.fit(global_batches(steps=4))
    assert not (tmp_path / 'checkpoints' / 'latest.pt').exists()
    assert 'stopped in the middle of a step: nothing saved' in capsys.readouterr().out


SIGTERM_RUN = """
import sys, torch
from flair_min.model import FLAIR, FlairConfig
from flair_min import recipe as R, train as T
torch.set_num_threads(1)

def endless():
    "The batches of ddp_train_worker.global_batches(), without end; each one announced on stdout."
    g = torch.Generator().manual_seed(0)
    for i in range(10 ** 6):
        batch = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 1000, (4, 2, 16), generator=g)
        print('batch', i, flush=True)
        yield batch

class Endless:
    def __iter__(self): return endless()

torch.manual_seed(0)
config = R.TrainConfig(steps=10 ** 6, warmup=1, lr=1e-3, progress=False, out_dir=sys.argv[1])
try: T.Trainer(FLAIR(FlairConfig.tiny()), config).fit(Endless())
except T.Interrupted as e: print('stopped by', e.signum.name, flush=True)
"""


def test_sigterm_saves_and_resume_goes_on(tmp_path):
    "A real process, sent SIGTERM (as timeout, docker stop, Slurm do) once it has taken 3 steps."
    script = tmp_path / 'run.py'
    script.write_text(SIGTERM_RUN)
    run = subprocess.Popen([sys.executable, str(script), str(tmp_path / 'run')], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in run.stdout:                     # ends if the process dies
            said.append(line)
            if line.strip() == 'batch 3': break     # steps 1-3 are done: it draws step 4's batch
        run.send_signal(signal.SIGTERM)
        rest, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None: run.kill(); run.wait()
    output = ''.join(said) + rest
    assert run.returncode == 0 and 'stopped by SIGTERM' in output, output[-2000:]
    latest = tmp_path / 'run' / 'checkpoints' / 'latest.pt'
    step = torch.load(latest, weights_only=True)['step']
    assert step >= 3 and f'interrupted by SIGTERM after step {step}: saved {latest}' in output
    batches = global_batches(steps=step + 2)
    straight = tiny_trainer(steps=10 ** 6).fit(batches, until=step + 2)
    resumed = tiny_trainer(steps=10 ** 6, out_dir=str(tmp_path / 'run'), resume='latest').fit(batches, until=step + 2)
    assert resumed['step'] == list(range(1, step + 3))
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-5)


def test_an_error_in_the_middle_of_a_run_saves_the_last_finished_step(tmp_path, capsys):
    batches = global_batches(steps=4)
    straight = tiny_trainer().fit(batches)
    with pytest.raises(OSError, match='connection reset by peer'):
        tiny_trainer(out_dir=str(tmp_path)).fit(RaisesAt(batches, 2, OSError('connection reset by peer')))
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    assert torch.load(latest, weights_only=True)['step'] == 2
    assert f"OSError after step 2: saved {latest}; continue with resume='latest'" in capsys.readouterr().err
    resumed = tiny_trainer(out_dir=str(tmp_path), resume='latest', init_seed=7).fit(batches)
    assert resumed['loss'] == pytest.approx(straight['loss'], abs=1e-6)
    bad_tokens = [(images, texts + 1000) for images, texts in batches]     # beyond the tiny vocabulary
    with pytest.raises(ValueError, match='vocabulary has 1000 entries'):
        tiny_trainer(out_dir=str(tmp_path / 'fresh')).fit(bad_tokens)
    assert not (tmp_path / 'fresh' / 'checkpoints' / 'latest.pt').exists()   # no step done: nothing to save


def nan_loss_from(call: int):
    "The FLAIR loss, NaN from its `call`-th call on (a run that diverges there)."
    flair, calls = make_loss('flair', 2), []
    def loss(generator=None, **out):
        calls.append(1)
        value = flair(**out, generator=generator)
        return value * float('nan') if len(calls) >= call else value
    return loss


def test_a_nan_loss_stops_the_run_before_its_update(tmp_path):
    trainer = tiny_trainer(steps=6, out_dir=str(tmp_path), save_every=1, loss=nan_loss_from(3))
    with pytest.raises(T.TrainingDiverged) as e:
        trainer.fit(global_batches(steps=6))
    latest = tmp_path / 'checkpoints' / 'latest.pt'
    message = str(e.value)
    assert '\n' not in message and message.startswith('loss became nan at step 3 (lr ')
    assert f'the last good checkpoint is {latest} (step 2)' in message and '--lr' in message
    checkpoint = torch.load(latest, weights_only=True)
    assert checkpoint['step'] == trainer.step == 2
    for name, value in trainer.model.state_dict().items():       # step 3's update was not applied
        assert torch.equal(checkpoint['state_dict']['module.' + name], value), name
    assert trainer.history['loss'] == checkpoint['history']['loss'] and len(trainer.history['loss']) == 2


def test_lr_1e9_diverges_with_one_line_and_leaves_finite_files(tmp_path):
    trainer = tiny_trainer(steps=6, lr=1e9, out_dir=str(tmp_path), save_every=1)
    with pytest.raises(T.TrainingDiverged, match=r'^loss became (nan|inf) at step (\d+) \(lr 1e\+09\): training '
                                                 r'diverged; the last good checkpoint is .*latest.pt \(step \d+\)'):
        trainer.fit(global_batches(steps=6))
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values())
    assert all(math.isfinite(v) for v in checkpoint['history']['loss'])
    T.write_run_summary(tmp_path, trainer.history)
    json.loads((tmp_path / 'history.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in history.json'))
    with pytest.raises(T.TrainingDiverged, match=r'at step 2 .*: training diverged; no checkpoint was saved'):
        tiny_trainer(steps=6, lr=1e9, out_dir=str(tmp_path / 'unsaved')).fit(global_batches(steps=6))
    assert not (tmp_path / 'unsaved' / 'checkpoints' / 'latest.pt').exists()


def nan_gradient_at(call: int):
    "The FLAIR loss, whose `call`-th call keeps its value but gives logit_bias a NaN gradient (0 · d√x at x = 0)."
    flair, calls = make_loss('flair', 2), []
    def loss(generator=None, **out):
        calls.append(1)
        value = flair(**out, generator=generator)
        return value + 0 * torch.sqrt(out['logit_bias'] * 0) if len(calls) == call else value
    return loss


def test_nonfinite_weights_are_never_saved(tmp_path):
    trainer = tiny_trainer(steps=6, out_dir=str(tmp_path), save_every=1, loss=nan_gradient_at(3))
    with pytest.raises(T.TrainingDiverged, match=r'the weights became non-finite \(logit_bias\) in step 3'):
        trainer.fit(global_batches(steps=6))
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'latest.pt', weights_only=True)
    assert checkpoint['step'] == 2 and all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values())


def test_out_dir_that_is_a_file_fails_when_the_trainer_is_built(tmp_path):
    (tmp_path / 'run').write_text('a file')
    with pytest.raises(NotADirectoryError, match=r"out_dir: .*run is a file; expected a folder"):
        tiny_trainer(out_dir=str(tmp_path / 'run'))
    (tmp_path / 'run2').mkdir(); (tmp_path / 'run2' / 'checkpoints').write_text('a file where the folder goes')
    with pytest.raises(OSError, match=r"out_dir: .*run2/checkpoints is a file; expected a folder"):
        tiny_trainer(out_dir=str(tmp_path / 'run2'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run', 'run2']


def test_out_dir_without_write_permission_fails_when_the_trainer_is_built(tmp_path):
    locked = tmp_path / 'locked'
    locked.mkdir(); locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK): pytest.skip('permission bits are not enforced here (running as root)')
        with pytest.raises(PermissionError, match=r"out_dir: cannot write in .*locked"):
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
        trainer = T.Trainer(model, R.TrainConfig(steps=3, warmup=1, lr=1e-3, eps=1e-4, progress=False, device='cpu',
                                                 fused_optimizer=fused))
        assert trainer.optimizer.defaults['fused'] == (fused or None)
        for batch in global_batches(steps=3): trainer.train_step([batch])
        states.append(model.state_dict())
    for name, value in states[0].items(): torch.testing.assert_close(states[1][name], value, atol=1e-5, rtol=1e-4)


def test_the_loss_is_built_once(monkeypatch):
    "A named loss is made once per run (its K from the first batch), not again at every step."
    built = []
    def counted(*args, **kwargs):
        built.append(args)
        return make_loss(*args, **kwargs)
    monkeypatch.setattr(T, 'make_loss', counted)
    tiny_trainer(steps=3, accum_steps=2).fit(micro_batches(global_batches(steps=3, num_captions=3), 2))
    assert [args[:2] for args in built] == [('flair', 3)]


class Told(list):
    "Batches with the loader's epoch protocol: told each epoch by the trainer, skipped samples by kind."
    def __init__(self, batches):
        super().__init__(batches)
        self.told = []
    def set_epoch(self, epoch): self.told.append(epoch)
    def skipped(self): return {'bad_image': len(self.told), 'no_caption': 1}


class OwnEpochs(Captioned):
    "A dataset with a set_epoch of its own, which a plain DataLoader around it does not call."
    told = []
    def set_epoch(self, epoch): self.told.append(epoch)


def test_the_trainer_tells_the_loader_each_epoch_and_counts_its_skips():
    loader = Told(global_batches(steps=2))                          # 2 batches an epoch: 5 steps reach epoch 2
    history = tiny_trainer(steps=5).fit(loader)
    assert loader.told == [0, 1, 2]
    assert history['skipped'] == [2, 2, 3, 3, 4]                   # the sum of skipped() when each step was done
    plain = DataLoader(OwnEpochs(n=4), batch_size=2, drop_last=True)
    assert tiny_trainer(steps=3).fit(plain)['skipped'] == [0, 0, 0] and OwnEpochs.told == []   # reseeded only


def test_recipes_state_the_scale_of_each_official_run():
    scale = {name: (r.gpus, r.gpus_in_scripts, r.samples, r.workers) for name, r in R.RECIPES.items()}
    assert scale == {'cc3m': (8, None, 2_823_019, 48), 'cc12m': (32, None, 10_010_225, 48),
                     'yfcc15m': (32, 8, 14_065_827, 48), 'merged30m': (32, 8, 27_000_000, 48)}
    for r in R.RECIPES.values():   # OpenCLIP's webdataset loader: batches rounded up to a multiple of its workers
        assert r.steps_per_epoch == math.ceil(math.ceil(r.samples / (r.batch_size * r.gpus)) / 48) * 48
    assert [r.steps_per_epoch for r in R.RECIPES.values()] == [2784, 1632, 2304, 6624]


def test_build_run_fills_both_configs_from_a_recipe():
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                  # each recipe on its own scale: no warning
        cc3m, data = R.build_run(FlairConfig(), 'cc3m', world=8, num_samples=2_823_019, num_workers=48)
        merged, merged_data = R.build_run(FlairConfig(), R.RECIPES['merged30m'], world=32, num_samples=27_000_000,
                                          num_workers=48)
    assert cc3m == R.TrainConfig(steps=32 * 2784)                       # the defaults are CC3M's recipe
    assert (data.batch_size, data.num_captions, data.image_size, data.context_length, data.seed) == (128, 8, 224, 77, 0)
    assert (merged.steps, merged.eps, merged.weight_decay) == (32 * 6624, 1e-6, 0.2)
    assert (merged_data.batch_size, merged_data.num_captions) == (128, 10)
    with pytest.warns(UserWarning):
        train, data = R.build_run(FlairConfig.tiny(), 'cc12m', steps=7, lr=1e-3, batch_size=None, num_captions=4,
                                  precision='fp32', seed=5, out_dir='run', num_workers=0)
    assert (train.steps, train.lr, train.weight_decay, train.precision, train.seed, train.out_dir) == \
        (7, 1e-3, 0.5, 'fp32', 5, 'run')
    assert (data.batch_size, data.num_captions, data.seed, data.image_size, data.context_length, data.num_workers) == \
        (192, 4, 5, 32, 16, 0)                                          # None: unset; sizes: the model config's
    train, data = R.build_run(FlairConfig.tiny(), steps=3)              # no recipe: the dataclasses' defaults
    assert (train, data) == (R.TrainConfig(steps=3), DataConfig(image_size=32, context_length=16, seed=0))


@pytest.mark.skipif(not (ROOT / 'data' / 'toy' / 'toy-train-000000.tar').exists(),
                    reason='the toy world has not written data/toy yet')
@pytest.mark.parametrize('world, workers, accum_steps, epochs', [(1, 0, 1, 1), (1, 2, 2, 2), (3, 2, 1, 1.5)])
def test_build_run_counts_the_steps_of_flair_min_loader(world, workers, accum_steps, epochs):
    train, data = R.build_run(FlairConfig.tiny(), epochs=epochs, world=world, num_samples=1001, batch_size=4,
                              num_workers=workers, accum_steps=accum_steps)
    loader = make_train_loader(str(ROOT / 'data' / 'toy' / 'toy-train-*.tar'), data, rank=0, world_size=world)
    assert train.steps == int(epochs * len(loader)) // accum_steps


def test_a_recipe_on_another_world_size_warns():
    with pytest.warns(UserWarning, match=r'^the CC3M-recap recipe was trained on 8 GPUs; this run has 1 process\(es\), '
                                         r'so its global batch \(128 images, official 1024\), the ring of negatives '
                                         r'and the steps per epoch differ$'):
        R.build_run(FlairConfig.tiny(), 'cc3m', steps=10)
    with pytest.warns(UserWarning, match=r'on 32 GPUs \(its official Slurm script requests 8\); this run has 8'):
        R.build_run(FlairConfig.tiny(), 'yfcc15m', world=8, steps=10)


@pytest.mark.parametrize('settings, error, expected', [
    (dict(steps=5, epochs=1), ValueError, 'steps=5 and epochs=1 both set the length of the run'),
    (dict(), ValueError, 'epochs=None with num_samples=None: the run has no known length; give steps, or epochs '
                         'with num_samples (the pairs of an epoch)'),
    (dict(recipe='cc3m', world=8), ValueError, 'epochs=32 with num_samples=None: the run has no known length'),
    (dict(recipe='laion', steps=5), ValueError, "recipe='laion': expected one of ['cc3m', 'cc12m'"),
    (dict(steps=5, image_size=64), TypeError, "['image_size'] follow the model config"),
    (dict(steps=5, batch_sise=4), TypeError, "unknown settings ['batch_sise']"),
    (dict(steps=5, lr=-1), ValueError, 'lr=-1: expected a finite number > 0'),
    (dict(steps=5, batch_size=0), ValueError, 'batch_size')])
def test_build_run_refuses_bad_settings(settings, error, expected):
    with pytest.raises(error) as e:
        R.build_run(FlairConfig.tiny(), **settings)
    assert expected in str(e.value)
