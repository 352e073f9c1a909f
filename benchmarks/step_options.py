"""What a FLAIR training step costs on the CPU besides the towers, and what the memory knobs trade (11_train §9).

    python benchmarks/step_options.py [--steps 10] [--option-steps 5] [--overhead-steps 5] [--out results/step_options]

Three measurements, all single-threaded (`--threads 1`) and with the tiny towers of `FlairConfig.tiny()`:

* flair_min's step against a straightforward one, on the same batch and the same starting weights: the tiny model
  with the CLIP vocabulary, B = 32 toy-world images (09_toyworld) with K = 8 sampled sub-captions each. The
  straightforward step builds the labels of both losses and picks the negatives in Python loops, as the official
  code does, and tokenizes the sub-caption strings inside the step; flair_min's gets token ids from its loader and
  builds indices and labels as tensor expressions (04_losses). Samples per second (the median step, the two steps
  interleaved so that load changes hit both alike) and the peak tensor memory a step allocates (from the allocation
  events of PyTorch's profiler).
* the parts of a step that differ between the two, timed alone at B = 32 and 128: the official-style label loops,
  flair_min's tensor labels (`downsample_caption_indices` + `pair_labels`), tokenizing the B·K strings.
* the memory knobs of `TrainConfig` on a batch where activations rather than the embedding dominate (the tiny
  preset's 1,000-token vocabulary, B = 64, K = 8): exact accumulation over 4 micro-batches of 16, gradient
  checkpointing of the towers, the loss scored in recomputed chunks of 8 images; each one `Trainer.train_step` on
  the same 64 images.

Ratios are against the baseline of the same run. Writes OUT.json and OUT.md (command, machine, date, figures).
"""
import argparse, math, random, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flair_min.captions import sample_subcaptions
from flair_min.losses import downsample_caption_indices, draw_negative_offsets, pair_labels
from flair_min.model import FLAIR, FlairConfig
from flair_min.tokenizer import SimpleTokenizer
from flair_min.toyworld import make_scene
from flair_min.recipe import TrainConfig, create_optimizer
from flair_min.train import Trainer
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
STEP_NAMES = {'flair_min': "flair_min's step", 'naive': 'straightforward step'}


def naive_flair_loss(out: dict, K: int, rng: random.Random) -> torch.Tensor:
    "Official-style FLAIR loss: labels and negative picks in Python loops."
    B = out['image_features'].shape[0]
    rows = []
    for i in range(B):
        row = [i * K + k for k in range(K)] + [j * K + rng.randrange(K) for j in range(B) if j != i]
        rows.append(sorted(row))
    tcs_labels, mps_labels = -torch.ones(B, K + B - 1), -torch.ones(B, B * K)
    for i in range(B): tcs_labels[i, i:i + K] = 1; mps_labels[i, i * K:(i + 1) * K] = 1
    texts = out['text_features'][torch.tensor(rows)]                                    # (B, K+B-1, D)
    pooled = out['visual_proj'](texts, out['image_tokens'], out['image_tokens'])          # (B, K+B-1, D)
    tcs_logits = (out['logit_scale'] * (F.normalize(pooled, dim=-1) * F.normalize(texts, dim=-1)).sum(-1)
                  + out['logit_bias'])
    mps_logits = (out['logit_scale'] * F.normalize(out['image_features'], dim=-1)
                  @ F.normalize(out['text_features'], dim=-1).T + out['logit_bias'])
    tcs = -F.logsigmoid(tcs_labels * tcs_logits).sum() / (K + B - 1)
    return (tcs - F.logsigmoid(mps_labels * mps_logits).sum() / (B * K)) / 2


def naive_step(model, optimizer, images, subcaptions, tokenizer, K, rng) -> torch.Tensor:
    "A straightforward step: tokenize the sub-caption strings, loop-built loss, AdamW step, temperature clamp."
    texts = tokenizer([s for caps in subcaptions for s in caps], context_length=model.context_length)  # every step
    loss = naive_flair_loss(model(images, texts), K, rng)
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    with torch.no_grad(): model.logit_scale.clamp_(0, math.log(100))
    return loss


def peak_memory_mib(fn) -> float:
    "Peak tensor memory (MiB) `fn` allocates on the CPU above what was live before, from the profiler's events."
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    return float(max(np.cumsum([0] + [e.nbytes() for e in events]))) / 2**20   # allocations +, frees -, in time order


def median_step_times(steps: dict, n: int) -> dict:
    "Median seconds per call of each function, calls interleaved (a, b, a, b, ...) so that load changes hit all alike."
    times = {name: [] for name in steps}
    for fn in steps.values(): fn()                                                    # warm-up
    for _ in range(n):
        for name, fn in steps.items():
            t0 = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def compare_steps(B: int = 32, K: int = 8, n: int = 10, seed: int = 0) -> dict:
    "{'flair_min', 'naive'}: (samples/s, peak MiB) of one training step on the same toy-world batch."
    config = replace(FlairConfig.tiny(), vocab_size=49408)
    rng = random.Random(seed)
    subcaptions = [sample_subcaptions(make_scene(i).sentences, K, 3, rng) for i in range(B)]
    images = torch.randn(B, 3, config.image_size, config.image_size)
    texts = SimpleTokenizer(context_length=config.context_length)([c for caps in subcaptions for c in caps])
    texts = texts.view(B, K, -1)                                                       # (B, K, T)
    torch.manual_seed(seed)
    ours = Trainer(FLAIR(config), TrainConfig(steps=100, warmup=1, progress=False, device='cpu'))
    torch.manual_seed(seed); model = FLAIR(config); opt = create_optimizer(model, TrainConfig())
    tokenizer = SimpleTokenizer(text_cache_size=0)                   # no cache of whole strings: tokenize every step
    steps = {'flair_min': lambda: ours.train_step([(images, texts)]),
             'naive': lambda: naive_step(model, opt, images, subcaptions, tokenizer, K, rng)}
    seconds = median_step_times(steps, n)
    return {name: (B / seconds[name], peak_memory_mib(fn)) for name, fn in steps.items()}


def loop_labels(B: int, K: int, rng: random.Random):
    "The official-style text indices and labels of both losses, built in Python loops."
    rows = [sorted([i * K + k for k in range(K)] + [j * K + rng.randrange(K) for j in range(B) if j != i])
            for i in range(B)]
    tcs, mps = -torch.ones(B, K + B - 1), -torch.ones(B, B * K)
    for i in range(B): tcs[i, i:i + K] = 1; mps[i, i * K:(i + 1) * K] = 1
    return torch.tensor(rows), tcs, mps


def tensor_labels(B: int, K: int, g: torch.Generator):
    "flair_min's text indices and labels of both losses, as tensor expressions (04_losses)."
    idx = downsample_caption_indices(draw_negative_offsets(B, K, generator=g), K)
    return idx, pair_labels(idx, K, torch.arange(B)), pair_labels(torch.arange(B * K)[None], K, torch.arange(B))


def step_overheads(B: int, K: int = 8, n: int = 5) -> dict:
    "Milliseconds per step: loop labels, tensor labels, tokenizing B·K toy-world sub-captions."
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    strings = [c for i in range(B) for c in sample_subcaptions(make_scene(i).sentences, K, 3, rng)]
    tokenizer = SimpleTokenizer(text_cache_size=0)
    ms = median_step_times({'loops': lambda: loop_labels(B, K, rng), 'tensors': lambda: tensor_labels(B, K, g),
                            'tokenize': lambda: tokenizer(strings)}, n)
    return {k: v * 1e3 for k, v in ms.items()}


def compare_options(B: int = 64, K: int = 8, n: int = 5, seed: int = 0, chunk: int = 8, accum: int = 4) -> dict:
    "{knob: (samples/s, peak MiB)} of one `Trainer.train_step` on the same batch, per memory knob."
    config = FlairConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    images, texts = torch.randn(B, 3, 32, 32, generator=g), torch.randint(1, 1000, (B, K, 16), generator=g)
    knobs = {'plain': {}, f'accum_steps={accum}': dict(accum_steps=accum),
             'grad_checkpointing': dict(grad_checkpointing=True),
             f'loss_chunk_size={chunk}': dict(loss_chunk_size=chunk)}
    steps = {}
    for name, knob in knobs.items():
        torch.manual_seed(seed)
        trainer = Trainer(FLAIR(config), TrainConfig(steps=1000, warmup=1, progress=False, device='cpu', **knob))
        a = trainer.config.accum_steps
        micro = [(images[i::a], texts[i::a]) for i in range(a)]  # any split works: the loss is that of all B images
        steps[name] = lambda trainer=trainer, micro=micro: trainer.train_step(micro)
    seconds = median_step_times(steps, n)
    return {name: (B / seconds[name], peak_memory_mib(fn)) for name, fn in steps.items()}


TITLE = "A training step on the CPU: flair_min's against a straightforward one, and the memory knobs"


def markdown(r: dict) -> str:
    "The body of the results note: three tables, two sentences."
    s, o = r['steps'], r['options']
    step_rows = '\n'.join(f"| {STEP_NAMES[name]} | {v['samples_per_s']:.1f} | {v['speed_vs_naive']:.2f}× | "
                          f"{v['peak_mib']:.0f} |" for name, v in s.items())
    over_rows = '\n'.join(f"| {b} | {v['loops']:.2f} | {v['tensors']:.2f} | {v['tokenize']:.1f} |"
                          for b, v in r['overheads_ms'].items())
    option_rows = '\n'.join(f"| `{name}` | {v['samples_per_s']:.1f} | {v['speed_vs_plain']:.2f}× | "
                            f"{v['peak_mib']:.0f} | {v['memory_vs_plain']:.2f}× |" for name, v in o.items())
    return f"""**One step** (tiny towers, CLIP vocabulary, {r['settings']['step_batch']} toy images × \
K = {r['settings']['K']}; median of {r['settings']['steps']} steps):

| step | samples/s | speed vs straightforward | peak tensor memory (MiB) |
|---|---|---|---|
{step_rows}

**What differs between them** (ms per step, median of {r['settings']['overhead_steps']}; K = {r['settings']['K']}):

| B | label loops | tensor labels | tokenizing B·K strings |
|---|---|---|---|
{over_rows}

**Memory knobs** (tiny towers, 1,000-token vocabulary, {r['settings']['option_batch']} images × K = \
{r['settings']['K']}; median of {r['settings']['option_steps']} steps):

| knob | samples/s | speed vs plain | peak tensor memory (MiB) | memory vs plain |
|---|---|---|---|---|
{option_rows}

Peak memory is what a step allocates above what was live before it (PyTorch's profiler). Ratios are against the \
baseline of the same run.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=10, help='timed steps of flair_min vs the straightforward step')
    parser.add_argument('--option-steps', type=int, default=5, help='timed steps per memory knob')
    parser.add_argument('--overhead-steps', type=int, default=5, help='timed calls per label/tokenize piece')
    parser.add_argument('--batch', type=int, default=32, help='images of the flair_min vs straightforward step')
    parser.add_argument('--option-batch', type=int, default=64, help='images of the memory-knob step')
    parser.add_argument('--overhead-batches', type=int, nargs='+', default=[32, 128])
    parser.add_argument('--num-captions', type=int, default=8, help='K sub-captions per image')
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'step_options'))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    K = args.num_captions
    started = time.perf_counter()
    steps = compare_steps(args.batch, K, args.steps)
    print('steps:', steps, flush=True)
    overheads = {str(b): step_overheads(b, K, args.overhead_steps) for b in args.overhead_batches}
    print('overheads (ms):', overheads, flush=True)
    options = compare_options(args.option_batch, K, args.option_steps)
    print('options:', options, flush=True)
    plain = options['plain']
    result = dict(
        **run_facts('step_options.py', argv),
        settings=dict(step_batch=args.batch, option_batch=args.option_batch, K=K, steps=args.steps,
                      option_steps=args.option_steps, overhead_steps=args.overhead_steps),
        steps={name: dict(samples_per_s=v[0], peak_mib=v[1], speed_vs_naive=v[0] / steps['naive'][0])
               for name, v in steps.items()},
        overheads_ms=overheads,
        options={name: dict(samples_per_s=v[0], peak_mib=v[1], speed_vs_plain=v[0] / plain[0],
                            memory_vs_plain=v[1] / plain[1]) for name, v in options.items()},
        wall_s=time.perf_counter() - started)
    write_results(args.out, result, TITLE, markdown(result))
    print(f'{result["wall_s"]:.0f} s')


if __name__ == '__main__':
    main()
