"""The ring (FLAIR's official multi-GPU objective, 04_losses §7): the one-process simulation against the official
reference values, and the real point-to-point exchange (gloo, CPU, spawned processes) against the simulation."""
import datetime, os, socket, sys, time, traceback, warnings
from pathlib import Path
import multiprocessing as mp

import pytest, torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import ROOT
from flair_min.losses import (FlairLoss, all_gather_with_grad, ring_exchange, ring_flair_loss_of_rank,
                              ring_flair_losses, ring_source_ranks)
from flair_min.model import TextConditionedPooling

REFERENCE = ROOT / 'data' / 'reference' / 'flair_ring.pt'   # computed with the official loss code (data/README.md)
FEATURES = ('image_features', 'image_tokens', 'text_features')
CASES = [dict(add_mps=True, chunk_size=None), dict(add_mps=False, chunk_size=None), dict(add_mps=True, chunk_size=1)]
STALL_S = 120          # fail a distributed test only after this long without any worker making progress
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()) or sys.platform == 'win32',
                                reason='needs torch.distributed with the gloo backend over TCP (Linux or macOS)')


@pytest.fixture(scope='module')
def ref():
    if not REFERENCE.exists(): pytest.skip(f'{REFERENCE} not found')
    return torch.load(REFERENCE, weights_only=True)


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def make_pool(state_dict):
    pool = TextConditionedPooling(64, 8)
    pool.load_state_dict({k.removeprefix('visual_proj.'): v for k, v in state_dict.items()})
    return pool


class Tower(nn.Module):
    "A tiny shared model for the DDP test: one linear map producing all three features, and the pooling layer."
    def __init__(self, pool_state_dict):
        super().__init__()
        self.proj, self.visual_proj = nn.Linear(64, 64), make_pool(pool_state_dict)

    def forward(self, image_features, image_tokens, text_features):
        return self.proj(image_features), self.proj(image_tokens), self.proj(text_features)


def make_tower_state(pool_state_dict):
    g = torch.Generator().manual_seed(0)
    tower = Tower(pool_state_dict)
    with torch.no_grad():
        tower.proj.weight.copy_(torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g))
        tower.proj.bias.copy_(0.1 * torch.randn(64, generator=g))
    return tower.state_dict()


def world_inputs(ref, world):
    "Per-rank tensors for `world` ranks: the reference's ranks, plus (W = 4) a fourth made from rank 0's, perturbed."
    ranks = [dict(r) for r in ref['ranks'][:world]]
    if world == 4:
        g = torch.Generator().manual_seed(4)
        fourth = {k: ref['ranks'][0][k] + 0.5 * torch.randn(ref['ranks'][0][k].shape, generator=g) for k in FEATURES}
        ranks.append(dict(fourth, negative_offsets=torch.randint(0, ref['num_captions'], (3, 2), generator=g)))
    return dict(ranks=[{k: r[k] for k in (*FEATURES, 'negative_offsets')} for r in ranks], K=ref['num_captions'],
                logit_scale=ref['logit_scale_exp'], logit_bias=ref['logit_bias'], pool=ref['pool_state_dict'],
                tower=make_tower_state(ref['pool_state_dict']))


def simulate(inputs, add_mps=True, tower=None):
    "Per-rank losses of the simulation, and the gradient of their sum w.r.t. each rank's features (or the tower)."
    leaves = [{k: r[k].clone().requires_grad_() for k in FEATURES} for r in inputs['ranks']]
    feats = [tower(*(l[k] for k in FEATURES)) if tower else [l[k] for k in FEATURES] for l in leaves]
    pool = tower.visual_proj if tower else make_pool(inputs['pool'])
    losses = ring_flair_losses(*map(list, zip(*feats)), [r['negative_offsets'] for r in inputs['ranks']],
                               inputs['logit_scale'], inputs['logit_bias'], pool, inputs['K'], add_mps)
    sum(losses).backward()
    return torch.stack(losses).detach(), [{k: l[k].grad for k in FEATURES} for l in leaves]


def assert_grad_close(actual, expected, rtol=1e-4, what=''):
    if expected is None:                                      # e.g. global image features when mps is off
        assert actual is None, what
        return
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert err < rtol, f'{what}: max |error| / max |reference| = {err.item():.2e}'


# ---------------------------------------------------------------- the simulation against the official values
def test_simulation_matches_official_reference(ref):
    inputs = world_inputs(ref, 3)
    losses, grads = simulate(inputs)
    for r, rank in enumerate(ref['ranks']):
        alone = simulate(dict(inputs, ranks=inputs['ranks'][r:r + 1]))[0][0]   # W = 1: the local loss only
        assert abs(alone - rank['loss_local']) < 1e-5, (r, alone.item(), rank['loss_local'].item())
        assert abs(losses[r] - rank['loss']) < 1e-5, (r, losses[r].item(), rank['loss'].item())
        for k in FEATURES:
            assert_grad_close(grads[r][k], rank['grads_of_sum'][k], what=f'rank {r} {k}')


def test_without_mps_the_ring_adds_tcs_terms_only(ref):
    inputs = world_inputs(ref, 3)
    with_mps, without = simulate(inputs)[0], simulate(inputs, add_mps=False)[0]
    assert (without - with_mps).abs().min() > 1e-3 and torch.isfinite(without).all()


@pytest.mark.parametrize('world', range(1, 10))
def test_each_rank_meets_every_other_rank_once(world):
    for r in range(world):
        assert sorted(ring_source_ranks(r, world)) == [s for s in range(world) if s != r]


# ---------------------------------------------------------------- the real exchange, in spawned processes
def _worker(rank, world, port, inputs_path, out_dir):
    "One rank: every case of the ring loss, DDP on a shared tower, the exchange order, the two all-gathers."
    out_dir = Path(out_dir)
    try:
        torch.set_num_threads(1)
        if sys.platform.startswith('linux'): os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
        _heartbeat(out_dir, rank, 'started')
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=100))
        try:
            torch.save(_worker_results(rank, world, torch.load(inputs_path, weights_only=True), out_dir),
                       out_dir / f'rank{rank}.pt')
        finally:
            dist.destroy_process_group()
        _heartbeat(out_dir, rank, 'done')
    except BaseException:
        (out_dir / f'rank{rank}.error').write_text(traceback.format_exc())
        raise


def _heartbeat(out_dir, rank, what, _count=[0]):
    _count[0] += 1
    (out_dir / f'rank{rank}.progress').write_text(f'{_count[0]} {what} {time.time()}')


def _worker_results(rank, world, inputs, out_dir):
    mine = inputs['ranks'][rank]
    pool, args = make_pool(inputs['pool']), (inputs['logit_scale'], inputs['logit_bias'])
    cases = []
    for case in CASES:
        leaves = {k: mine[k].clone().requires_grad_() for k in FEATURES}
        loss = ring_flair_loss_of_rank(*(leaves[k] for k in FEATURES), mine['negative_offsets'], *args, pool,
                                       inputs['K'], **case)
        loss.backward()
        cases.append(dict(loss=loss.detach(), grads={k: v.grad for k, v in leaves.items()}))
        _heartbeat(out_dir, rank, f'case {case}')
    tower = Tower(inputs['pool'])
    tower.load_state_dict(inputs['tower'])
    ddp = DistributedDataParallel(tower)
    loss = ring_flair_loss_of_rank(*ddp(*(mine[k] for k in FEATURES)), mine['negative_offsets'], *args,
                                   ddp.module.visual_proj, inputs['K'])
    loss.backward()
    ddp_grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
    _heartbeat(out_dir, rank, 'ddp')
    flair_loss = FlairLoss(inputs['K'])(*(mine[k] for k in FEATURES), *args, pool,
                                        negative_offsets=mine['negative_offsets'])   # the default under DDP: the ring
    order = [int(t.item()) for t in ring_exchange(torch.tensor([float(rank)]))]
    return dict(cases=cases, ddp_loss=loss.detach(), ddp_grads=ddp_grads, order=order, flair_loss=flair_loss.detach(),
                gather=_gathers(rank, world, mine['text_features']))


def _gathers(rank, world, texts):
    "Values and gradients of the new and the deprecated all-gather under a nonlinear, rank-dependent loss."
    weights = torch.randn(world * texts.shape[0], texts.shape[1], generator=torch.Generator().manual_seed(rank))
    out = {}
    from torch.distributed.nn.functional import all_gather as deprecated_all_gather
    for name, gather in (('new', all_gather_with_grad), ('old', lambda t: torch.cat(deprecated_all_gather(t)))):
        x = texts.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)                      # the old one is deprecated
            gathered = gather(x)                                                 # (W·N, D)
        (gathered.tanh() * weights).sum().backward()
        out[name] = dict(value=gathered.detach(), grad=x.grad, weights=weights)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _progress(out_dir, world):
    return tuple((out_dir / f'rank{r}.progress').read_text() if (out_dir / f'rank{r}.progress').exists() else ''
                 for r in range(world))


def _reap(procs, out_dir, world):
    "Wait while workers progress; stop them all when one fails or none progressed for STALL_S. ('' if all ok)."
    seen, last_change = _progress(out_dir, world), time.monotonic()
    while any(p.is_alive() for p in procs):
        next(p for p in procs if p.is_alive()).join(timeout=5)
        if any(p.exitcode not in (None, 0) for p in procs): break
        now, progress = time.monotonic(), _progress(out_dir, world)
        if progress != seen: seen, last_change = progress, now
        elif now - last_change > STALL_S: break
    stalled = any(p.is_alive() for p in procs) and not any(p.exitcode not in (None, 0) for p in procs)
    for p in procs:
        if p.is_alive(): p.terminate(); p.join(10)
        if p.is_alive(): p.kill(); p.join()
    errors = ''.join(f'--- rank {r} ---\n{(out_dir / f"rank{r}.error").read_text()}' for r in range(world)
                     if (out_dir / f'rank{r}.error').exists())
    if stalled: return f'no progress for {STALL_S}s; last heartbeats: {seen}\n{errors}'
    return errors or ''.join(f'rank {r} exited with {p.exitcode}\n' for r, p in enumerate(procs) if p.exitcode)


def run_workers(inputs, world, out_dir, attempts=3):
    "Run `world` spawned workers on `inputs`; retry on a fresh port if another process took ours meanwhile."
    torch.save(inputs, out_dir / 'inputs.pt')
    ctx = mp.get_context('spawn')
    for attempt in range(attempts):
        for f in out_dir.glob('rank*'): f.unlink()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, str(out_dir / 'inputs.pt'), str(out_dir)))
                 for r in range(world)]
        for p in procs: p.start()
        failure = _reap(procs, out_dir, world)
        if not failure: return [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in range(world)]
        if 'ddress already in use' not in failure: break
    pytest.fail(f'distributed workers (W = {world}) failed:\n{failure}')


@pytest.fixture(scope='module', params=[2, 3, 4], ids=lambda w: f'W{w}')
def distributed(request, ref, tmp_path_factory):
    "(world, inputs, per-rank worker results): one spawn of W workers serves all the distributed tests."
    world = request.param
    inputs = world_inputs(ref, world)
    return world, inputs, run_workers(inputs, world, tmp_path_factory.mktemp(f'ring_w{world}'))


@needs_gloo
def test_exchange_visits_ranks_in_official_order(distributed):
    world, _, ranks = distributed
    for r, result in enumerate(ranks):
        assert result['order'] == ring_source_ranks(r, world)


@needs_gloo
@pytest.mark.parametrize('case', range(len(CASES)), ids=lambda c: 'mps{add_mps}-chunk{chunk_size}'.format(**CASES[c]))
def test_exchange_equals_simulation(distributed, case):
    world, inputs, ranks = distributed
    losses, grads = simulate(inputs, add_mps=CASES[case]['add_mps'])
    for r, result in enumerate(ranks):
        got = result['cases'][case]
        assert abs(got['loss'] - losses[r]) < 1e-5, (r, got['loss'].item(), losses[r].item())
        for k in FEATURES:
            assert_grad_close(got['grads'][k], grads[r][k], what=f'rank {r} {k}')


@needs_gloo
def test_flair_loss_defaults_to_the_ring(distributed):
    world, inputs, ranks = distributed
    losses = simulate(inputs)[0]
    for r, result in enumerate(ranks): assert abs(result['flair_loss'] - losses[r]) < 1e-5, r


@needs_gloo
def test_ddp_gradient_is_mean_of_rank_loss_gradients(distributed):
    world, inputs, ranks = distributed
    tower = Tower(inputs['pool'])
    tower.load_state_dict(inputs['tower'])
    losses = simulate(inputs, tower=tower)[0]
    for r, result in enumerate(ranks):
        assert abs(result['ddp_loss'] - losses[r]) < 1e-5
        for name, p in tower.named_parameters():                      # DDP's average: (1/W)·∇Σ_r loss_r
            assert_grad_close(result['ddp_grads'][name], p.grad / world, what=f'rank {r} {name}')


@needs_gloo
def test_all_gather_with_grad_equals_deprecated_all_gather(distributed):
    world, inputs, ranks = distributed
    texts = torch.cat([r['text_features'] for r in inputs['ranks']])         # (W·N, D)
    weights = sum(result['gather']['new']['weights'] for result in ranks)     # Σ_r of each rank's loss weights
    expected = (weights * (1 - texts.tanh() ** 2)).chunk(world)               # W × (N, D): ∂Σ_r loss_r / ∂x_r
    for r, result in enumerate(ranks):
        new, old = result['gather']['new'], result['gather']['old']
        assert torch.equal(new['value'], old['value']) and torch.equal(new['value'], texts)
        torch.testing.assert_close(new['grad'], old['grad'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new['grad'], expected[r], rtol=1e-5, atol=1e-5)
