"""One FLAIR training step on the CPU: flair_min's step as it was (the "reference") against today's, same batch.

    python benchmarks/train_speed.py [--steps 8] [--rounds 3] [--out results/train_speed]
    python benchmarks/train_speed.py --demo [--out results/demo_step_speed]

The model is a ViT-T FLAIR (embed 128; vision 64 px, patch 8, width 128, 4 layers, head width 64; text context 32,
CLIP vocabulary, width 128, 2 heads, 4 layers); the batch is 64 toy-world images (09_toyworld) with K = 4 sampled
sub-captions each, fp32. Variants, timed in turn on the same batch and the same starting weights, `--rounds` rounds
of `--steps` steps each (the machine's load hits all variants alike; a variant's time is its median step):

* reference: the step before the speed work — every text runs through all 32 positions, AdamW unfused;
* text tower trimmed: the texts run sorted by length in buckets of 64, each only up to its longest text's
  end-of-text, and the last block only at each end-of-text (FLAIR.embed_text and TextTransformer.global_tokens,
  02_model; exact: the attention is causal and a text's embedding is read at its end-of-text);
* text tower trimmed + fused AdamW: also the optimizer's fused kernel (TrainConfig.fused_optimizer, 10_recipe).

With `--demo`, the model and the batch are those of `flair-min demo` (17_demo: the toy FLAIR, 32 images × K = 8
sub-captions of 77 tokens from its loader).

It checks that the variants compute the same loss and gradients (to float tolerance), and measures the machine's
float32 matmul rate in the same run. Writes OUT.json and OUT.md (command, machine, date, figures).
"""
import argparse, json, os, platform, statistics, sys, time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flair_min.captions import sample_subcaptions, split_caption
from flair_min.losses import FlairLoss
from flair_min.model import FLAIR, FlairConfig
from flair_min.tokenizer import get_tokenizer
from flair_min.toyworld import join_sentences, make_scene
from flair_min.recipe import TrainConfig
from flair_min.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = FlairConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=2,
                     context_length=32, vocab_size=49408, text_width=128, text_layers=4, text_heads=2)


class UntrimmedFLAIR(FLAIR):
    "FLAIR as it was before the speed work: every text runs through all context positions and all blocks."
    def embed_text(self, texts): return self.text_post(self.encode_text(texts)[0])


def toy_batch(batch_size: int = 64, k: int = 4, seed: int = 0):
    "(images (B, 3, 64, 64) normalised, texts (B, K, 32)): toy scenes with K sampled sub-captions each."
    rng, tok = np.random.default_rng(seed), get_tokenizer(context_length=CONFIG.context_length)
    from flair_min.model import image_transform
    from PIL import Image
    transform = image_transform(64)
    scenes = [make_scene(i) for i in range(batch_size)]
    images = torch.stack([transform(Image.fromarray(s.image)) for s in scenes])
    import random
    texts = torch.stack([tok(sample_subcaptions(split_caption(join_sentences(s.sentences)), k, 3,
                                                random.Random(int(rng.integers(1 << 30))))) for s in scenes])
    return images, texts


def demo_setup():
    "(model config, one training batch) of the default `flair-min demo`."
    from flair_min.demo import DemoConfig, demo_model_config, make_demo_loader, prepare_toy_data
    demo = DemoConfig(out=str(ROOT / 'runs' / 'speed-demo'), train_scenes=512, eval_scenes=16, progress=False)
    images, texts, *_ = next(iter(make_demo_loader(prepare_toy_data(demo)[0], demo)))
    return demo_model_config(demo), (images, texts)


def make_trainer(variant: str, state: dict, config: FlairConfig = CONFIG) -> Trainer:
    "A Trainer of the variant, from the shared starting weights."
    model = (UntrimmedFLAIR if variant == 'reference' else FLAIR)(config)
    model.load_state_dict(state)
    fused = variant == 'text tower trimmed + fused AdamW'
    config = TrainConfig(steps=10_000, warmup=10, lr=1e-4, progress=False, device='cpu', fused_optimizer=fused)
    return Trainer(model, config)


def timed_steps(trainer: Trainer, batch, steps: int) -> list[float]:
    "Seconds of each of `steps` optimizer steps on the same batch."
    times = []
    for _ in range(steps):
        tic = time.perf_counter(); trainer.train_step([batch]); times.append(time.perf_counter() - tic)
    return times


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    "The machine's float32 matmul rate now (GFLOP/s, best of `repeats`)."
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(fn) -> float:
    tic = time.perf_counter(); fn(); return time.perf_counter() - tic


def same_step(state: dict, batch, config: FlairConfig = CONFIG) -> dict:
    "Max differences of loss and gradients between the reference and today's model on one forward/backward."
    out = {}
    grads = {}
    for cls in (UntrimmedFLAIR, FLAIR):
        model = cls(config); model.load_state_dict(state)
        g = torch.Generator().manual_seed(0)
        loss = FlairLoss(batch[1].shape[1])(**model(batch[0], batch[1].flatten(0, 1)), generator=g)
        loss.backward()
        grads[cls.__name__] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    (l0, g0), (l1, g1) = grads['UntrimmedFLAIR'], grads['FLAIR']
    out['loss_abs_diff'] = abs(l0 - l1)
    out['grad_max_rel_diff'] = max(float((g0[n] - g1[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12)) for n in g0)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=8, help='timed steps per variant per round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--demo', action='store_true', help="the demo's model and batch instead of the ViT-T one")
    parser.add_argument('--out', default=None, help='default: results/train_speed or results/demo_step_speed')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    config, batch = demo_setup() if args.demo else (CONFIG, toy_batch())
    state = FLAIR(config).state_dict()
    lengths = (batch[1] != 0).sum(-1)
    exact = same_step(state, batch, config)
    variants = ('reference', 'text tower trimmed', 'text tower trimmed + fused AdamW')
    trainers = {v: make_trainer(v, state, config) for v in variants}
    for t in trainers.values(): timed_steps(t, batch, 2)                              # warm-up
    times, rates = {v: [] for v in variants}, []
    for r in range(args.rounds):
        rates.append(matmul_gflops())
        for v in variants: times[v] += timed_steps(trainers[v], batch, args.steps)
        print(f'round {r + 1}: ' + ', '.join(f'{v} {statistics.median(times[v]):.3f} s' for v in variants), flush=True)
    median = {v: statistics.median(t) for v, t in times.items()}
    result = dict(command='python benchmarks/train_speed.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
                  machine=f'{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}',
                  threads=torch.get_num_threads(), date=f'{datetime.now(timezone.utc):%Y-%m-%d}',
                  batch=f'{len(batch[0])} toy images x K={batch[1].shape[1]} sub-captions, '
                        f'{batch[1].shape[2]} token columns',
                  model="the demo's toy FLAIR" if args.demo else 'ViT-T',
                  text_tokens_mean=float(lengths.float().mean()),
                  text_tokens_max=int(lengths.max()), median_step_s=median,
                  speedup={v: median['reference'] / median[v] for v in variants},
                  matmul_gflops=rates, exactness=exact, steps=args.steps, rounds=args.rounds)
    out = Path(args.out or ROOT / 'results' / ('demo_step_speed' if args.demo else 'train_speed'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=1))
    rows = '\n'.join(f'| {v} | {median[v]:.3f} | {result["speedup"][v]:.2f}× |'
                     for v in variants)
    out.with_suffix('.md').write_text(f"""### One FLAIR training step on the CPU
({result['model']}, {result['batch']}, fp32)

Command: `{result['command']}`. Machine: {result['machine']}, threads: {result['threads']}. Date: {result['date']}.
Texts: {result['text_tokens_mean']:.1f} tokens on average (with SOT/EOT), at most {result['text_tokens_max']}.
Float32 matmul rate during the run: {min(rates):.0f}–{max(rates):.0f} GFLOP/s.

| variant | median step (s) | speed-up over the reference |
|---|---|---|
{rows}

Exactness (reference vs text tower trimmed, one forward and backward): loss differs by
{exact['loss_abs_diff']:.1e}, gradients by at most {exact['grad_max_rel_diff']:.1e} of each tensor's largest entry.
""")
    print(out.with_suffix('.md').read_text())


if __name__ == '__main__':
    main()
