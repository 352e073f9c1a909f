"""One rank of the two-process FLAIR-loss test (started by tests/test_distributed.py, not collected by pytest).

Usage: python dist_worker.py RANK WORLD_SIZE PORT INPUTS.pt OUTPUT.pt
Joins a gloo process group on 127.0.0.1:PORT, wraps the tiny FLAIR in DistributedDataParallel, computes
FlairLoss (the all-gather variant) on its slice of the global batch for each case in INPUTS['cases'], and saves the
loss and the (DDP-averaged) gradients of every case to OUTPUT.pt.
"""
import datetime, sys, time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from flair_min.model import FLAIR
from flair_min.losses import FlairLoss


def run_case(model, images, texts, case):
    model.zero_grad(set_to_none=True)
    # differs per rank: rank 0's draw must win
    generator = torch.Generator().manual_seed(case['seed'] + dist.get_rank())
    loss = FlairLoss(case['num_captions'], add_mps=case['add_mps'], chunk_size=case['chunk_size'],
                     distributed='gather')(**model(images, texts), negative_offsets=case['negative_offsets'],
                                           generator=generator)
    loss.backward()
    return {'loss': loss.detach(), 'grads': {n: p.grad.clone() for n, p in model.module.named_parameters()}}


def heartbeat(output_path, what):
    "Tell the parent this rank made progress (it detects a hang by the lack of it, not by wall time)."
    Path(f'{output_path}.progress').write_text(f'{what} {time.time()}')


def main(rank, world_size, port, inputs_path, output_path):
    torch.set_num_threads(1)
    heartbeat(output_path, 'started')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        inputs = torch.load(inputs_path, weights_only=True)
        model = DistributedDataParallel(FLAIR.from_state_dict(inputs['state_dict']))
        b, K = inputs['images'].shape[0] // world_size, inputs['num_captions']
        images = inputs['images'][rank * b:(rank + 1) * b]            # this rank's images ...
        texts = inputs['texts'][rank * b * K:(rank + 1) * b * K]      # ... and their texts, image by image
        results = []
        for c, case in enumerate(inputs['cases']):
            results.append(run_case(model, images, texts, dict(case, num_captions=K)))
            heartbeat(output_path, f'case {c}')
        torch.save(results, output_path)
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    rank, world_size, port = map(int, sys.argv[1:4])
    main(rank, world_size, port, *sys.argv[4:6])
