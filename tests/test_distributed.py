"""FlairLoss's all-gather variant under torch.distributed: 2 CPU processes (gloo) running DDP on a global batch of 4
images must give the loss and the gradients of one process on the same 4 images with the same negatives. (The official
ring objective, the default, is tested against its reference values in tests/test_ring.py.)"""
import os, socket, subprocess, sys, time

import pytest, torch
import torch.distributed as dist

from conftest import ROOT
from flair_min.model import FLAIR
from flair_min.losses import FlairLoss, draw_negative_offsets

WORKER = ROOT / 'tests' / 'dist_worker.py'
WORLD, IMAGES, K, STALL_S = 2, 4, 2, 120   # fail only after STALL_S seconds without any worker's progress

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()) or sys.platform == 'win32',
                                 reason='needs torch.distributed with the gloo backend over TCP (Linux or macOS)'),
              pytest.mark.usefixtures('one_thread')]   # one_thread: conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def make_inputs(state_dict):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGES, 3, 32, 32, generator=g)
    texts = torch.zeros(IMAGES * K, 16, dtype=torch.long)
    for row, n in zip(texts, torch.randint(1, 14, (IMAGES * K,), generator=g).tolist()):  # [SOT, n ids, EOT, 0...]
        row[0], row[n + 1] = 998, 999
        row[1:n + 1] = torch.randint(1, 998, (n,), generator=g)
    offsets = draw_negative_offsets(IMAGES, K, generator=g)
    cases = [dict(add_mps=True, chunk_size=None, negative_offsets=offsets, seed=0),
             dict(add_mps=False, chunk_size=None, negative_offsets=offsets, seed=0),
             dict(add_mps=True, chunk_size=1, negative_offsets=offsets, seed=0),
             dict(add_mps=True, chunk_size=None, negative_offsets=None, seed=123)]  # drawn on rank 0, broadcast
    return dict(state_dict=state_dict, images=images, texts=texts, num_captions=K, cases=cases)


def run_workers(inputs_path, tmp_path, attempts=3):
    "Run the workers; retry on a fresh port if another process took ours between choosing and binding it."
    for _ in range(attempts):
        ok, text = start_and_reap(inputs_path, tmp_path)
        if ok or 'ddress already in use' not in text: break
    assert ok, f'distributed workers failed or made no progress for {STALL_S}s:\n{text}'
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]


def start_and_reap(inputs_path, tmp_path):
    "Start WORLD worker processes; stop them all when one fails or none progressed for STALL_S; (all succeeded, logs)."
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    if sys.platform.startswith('linux'): env.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    port = free_port()
    logs = [open(tmp_path / f'rank{r}.log', 'w+') for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(port), str(inputs_path),
                               str(tmp_path / f'rank{r}.pt')], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(WORLD)]
    try:
        progress = lambda: [(tmp_path / f'rank{r}.pt.progress').read_text()
                            if (tmp_path / f'rank{r}.pt.progress').exists() else '' for r in range(WORLD)]
        seen, last_change = progress(), time.monotonic()
        while time.monotonic() - last_change < STALL_S:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes): break  # all done, or one failed
            if (now := progress()) != seen: seen, last_change = now, time.monotonic()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
            p.wait()
    text = ''
    for r, log in enumerate(logs):
        log.seek(0); text += f'--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()}\n'; log.close()
    return all(p.returncode == 0 for p in procs), text


def single_process(state_dict, inputs, case):
    model = FLAIR.from_state_dict(state_dict)
    loss = FlairLoss(K, add_mps=case['add_mps'], chunk_size=case['chunk_size'], distributed='gather')(
        **model(inputs['images'], inputs['texts']), negative_offsets=case['negative_offsets'])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_two_processes_equal_one(flair_tiny, tmp_path):
    inputs = make_inputs(flair_tiny['state_dict'])
    torch.save(inputs, tmp_path / 'inputs.pt')
    ranks = run_workers(tmp_path / 'inputs.pt', tmp_path)
    for c, case in enumerate(inputs['cases']):
        if case['negative_offsets'] is None:  # rank 0 drew with seed 123 + 0, and broadcast its draw
            case = dict(case, negative_offsets=draw_negative_offsets(IMAGES, K,
                                                                     generator=torch.Generator().manual_seed(123)))
        loss, grads = single_process(flair_tiny['state_dict'], inputs, case)
        rank_losses = torch.stack([r[c]['loss'] for r in ranks])
        torch.testing.assert_close(rank_losses.mean(), loss, rtol=1e-5, atol=1e-5)  # mean over ranks = global loss
        for r in ranks:
            assert set(r[c]['grads']) == set(grads)
            for name, g in grads.items():                                          # DDP's average = global gradient
                err = (r[c]['grads'][name] - g).norm() / g.norm().clamp_min(1e-12)
                assert err < 1e-5, (c, name, err.item())
