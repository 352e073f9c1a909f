"""Worker of tests/test_train.py::test_two_process_ddp_matches_one_process: two processes forked by the test (`spawned`,
which sets the environment torchrun would set), or started by hand with
`torchrun --standalone --nproc_per_node=2 tests/ddp_train_worker.py OUT`.

Each process trains the tiny model on its half of every global batch (images rank*b .. rank*b+b-1),
three runs in one process group that one process on the whole batches must reproduce: the FLAIR loss (its all-gather
variant), the global multi-positive loss (its pooling layer is unused, so DDP must look for unused parameters), and the
FLAIR loss with two accumulated micro-batches; and a fourth with the default, the official ring objective.
Rank 0 saves the histories and the final weights to OUT/ddp.pt.
"""
import os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from flair_min.model import FLAIR, FlairConfig
from flair_min.losses import init_distributed
from flair_min.recipe import TrainConfig
from flair_min.train import Trainer

RUNS = {'flair': dict(loss='flair', distributed_loss='gather'), 'mps': dict(loss='mps'),
        'flair_accum': dict(loss='flair', accum_steps=2, distributed_loss='gather')}
RING = dict(loss='flair')   # the default objective under DDP: the official ring, which no single process computes


def global_batches(steps: int = 3, batch_size: int = 4, num_captions: int = 2, seed: int = 0):
    "The same `steps` global batches (images (B, 3, 32, 32), texts (B, K, 16)) in every process."
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 32, 32, generator=g),
             torch.randint(1, 1000, (batch_size, num_captions, 16), generator=g))
            for _ in range(steps)]


def micro_batches(batches, parts: int):
    "Each batch cut into `parts` consecutive micro-batches (the loader's batches when accumulating)."
    return [(images[i * len(images) // parts:(i + 1) * len(images) // parts],
             texts[i * len(texts) // parts:(i + 1) * len(texts) // parts])
            for images, texts in batches for i in range(parts)]


def train_run(batches, **knobs):
    "Train a freshly seeded tiny model on `batches`; (loss history, final state dict)."
    torch.manual_seed(0)
    model = FLAIR(FlairConfig.tiny())
    # eps=1e-4: gradients that are zero in exact arithmetic (key biases) differ in round-off between one and two
    # processes, and Adam with eps=1e-8 would turn that round-off into full-size updates
    config = TrainConfig(steps=3, warmup=1, lr=1e-3, eps=1e-4, progress=False, device='cpu', **knobs)
    history = Trainer(model, config).fit(micro_batches(batches, config.accum_steps))
    return history['loss'], model.state_dict()


def main(out: str):
    torch.set_num_threads(1)
    rank, world = init_distributed()
    b = 4 // world
    shard = [(images[rank * b:(rank + 1) * b], texts[rank * b:(rank + 1) * b]) for images, texts in global_batches()]
    results = {}
    for name, knobs in {**RUNS, 'ring': RING}.items():
        results[name] = train_run(shard, **knobs)
        Path(out, f'rank{rank}.progress').write_text(name)    # the parent detects a hang by the lack of progress
    ring_weights = results['ring'][1]
    for name, value in ring_weights.items():                    # DDP keeps every rank's weights the same
        others = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(others, value)
        assert all(torch.equal(o, others[0]) for o in others), name
    if rank == 0: torch.save({'world': world, **results}, f'{out}/ddp.pt')
    dist.barrier()
    dist.destroy_process_group()


def spawned(rank: int, world: int, port: int, out: str):
    "Entry of a forked process: the environment variables torchrun would set, then `main`."
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    main(out)


if __name__ == '__main__':
    main(sys.argv[1])
