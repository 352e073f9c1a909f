"""Many `flair-min demo` variants side by side: which settings change FLAIR's margin over the baseline?

    python benchmarks/demo_sweep.py [--sweep settings|worlds] [--device cuda] [--processes 4] [--workers 3]
                                    [--out runs/demo-sweep] [--minutes 7] [--only NAME ...] [--set FIELD=VALUE ...]

Each variant is the default `DemoConfig` with a few fields changed (and, for `--sweep worlds`, a
few `ToyWorldConfig` fields of both the training and the evaluation world). For each, FLAIR and
the mps baseline are trained from the same weights on the same batches, on `--device`, then
evaluated on the CPU with `evaluate_demo_model` (the table of `flair-min demo`, attribute swaps,
probes); variants longer than 800 steps also log the fine-grained R@1 and the swap accuracies
every 800 steps. Results are appended as JSON lines to `out/results.jsonl`, one per variant, and
a summary table is printed at the end. The variants are dealt round-robin to `--processes`
processes; a process starts no new variant after `--minutes`.

`results/demo_sweep.md` keeps both sweeps, run on one H200 machine (16 CPU cores: 4 processes of
1 + 3 loader workers each, about 5 minutes per sweep): the same variants, training and evaluation as
here. Worlds with 3 shapes and 4 colours together, or with one colour, leave no evaluation sentence
that is true of exactly one image, so the fine-grained metrics cannot be computed; they are not listed.
The variants carry the sigmoid bias the sweeps began with, −5; `bias-10` is today's default. The two
`cell48` variants (48-pixel images, one 16-pixel patch per cell) are not in those sweeps;
`results/demo_sweep.md` reports CPU runs of that world with the default bias.
"""
import argparse, copy, json, time
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

SETTINGS = [
    ('base', {}), ('twins', {'train_twins': True}), ('lr3e-3', {'lr': 3e-3}),
    ('twins_lr3e-3', {'train_twins': True, 'lr': 3e-3}), ('base_3200', {'steps': 3200}),
    ('twins_3200', {'train_twins': True, 'steps': 3200}), ('bias-10', {'init_logit_bias': -10.0}),
    ('merged1', {'max_merged': 1}), ('bs64_400', {'batch_size': 64, 'steps': 400}), ('lr3e-4', {'lr': 3e-4}),
    ('width128', {'width': 128}), ('k4', {'num_captions': 4}),
    ('twins_lr3e-3_3200', {'train_twins': True, 'lr': 3e-3, 'steps': 3200}),
    ('vl6', {'vision_layers': 6}), ('seed1', {'seed': 1}), ('twins_seed1', {'train_twins': True, 'seed': 1}),
    ('d64', {'embed_dim': 64}), ('bs128_200', {'batch_size': 128, 'steps': 200}),
    ('twins_bs64_800', {'train_twins': True, 'batch_size': 64}),
    ('wd0', {'weight_decay': 0.0}), ('cell48', {'image_size': 48, 'patch_size': 16}),
    ('cell48_merged1', {'image_size': 48, 'patch_size': 16, 'max_merged': 1})]
S3, C4, BG1 = ({'shapes': ('circle', 'square', 'triangle')}, {'colours': ('red', 'green', 'blue', 'yellow')},
               {'backgrounds': ('gray',), 'textures': ('plain',)})
WORLDS = [
    ('s3', {'world': S3}), ('c4', {'world': C4}), ('bg1', {'world': BG1}),
    ('obj2-4', {'world': {'min_objects': 2, 'max_objects': 4}}),
    ('cpi1', {'world': {'colours_per_image': (1, 1), 'shapes_per_image': (3, 3)}}),
    ('s4', {'world': {'shapes': ('circle', 'square', 'triangle', 'cross')}})]
SWEEPS = {'settings': [(n, {'init_logit_bias': -5.0, **o}) for n, o in SETTINGS],
          'worlds': [(n, {'init_logit_bias': -5.0, **o}) for n, o in WORLDS]}


def light_evaluation(split, images, mode: str):
    """The training hook of long variants: fine-grained R@1/R@5 and the attribute swaps of a CPU copy of the model,
    scored `mode`."""
    from flair_min.toy_eval import attribute_swap_accuracy, retrieval_results
    def evaluate(model):
        m = copy.deepcopy(model).float().cpu().eval()
        fine = retrieval_results(m, images, split, mode)['fine_grained']
        swaps = attribute_swap_accuracy(m, images, split, mode)
        return {'fg_t2i_R1': fine['text_to_image_R@1'], 'fg_t2i_R5': fine['text_to_image_R@5'],
                **{f'swap_{k}': v for k, v in swaps.items()}}
    return evaluate


def run_variant(name: str, overrides: dict, args) -> dict:
    import numpy as np, torch
    import flair_min.demo as E
    from flair_min.toy_eval import eval_images, evaluate_toy_model, margins
    from flair_min.model import FLAIR
    from flair_min.toyworld import ToyWorldConfig, load_eval_split
    from flair_min.recipe import TrainConfig
    from flair_min.train import train
    overrides = dict(overrides); world = overrides.pop('world', {})
    E.training_world = lambda c: replace(ToyWorldConfig(image_size=c.image_size, seed=c.seed,
                                                        binding_twins=c.train_twins), **world)
    c = E.demo_config(out=str(Path(args.out) / name), progress=False, plots=False, workers=args.workers, **overrides)
    shards, split_path = E.prepare_toy_data(c, Path(args.out) / 'data' / name)
    split = load_eval_split(split_path); images = eval_images(split)
    loader, result = E.make_demo_loader(shards, c), {'name': name, 'overrides': {**overrides, 'world': world}}
    for model_name, loss, mode in (('flair', 'flair', 'flair'), ('baseline', 'mps', 'global')):
        torch.manual_seed(c.seed); model, tic = FLAIR(E.demo_model_config(c)), time.perf_counter()
        every = 800 if c.steps > 800 else None
        history = train(model, loader,
                        TrainConfig(steps=c.steps, lr=c.lr, weight_decay=c.weight_decay, warmup=min(c.warmup, c.steps),
                                    loss=loss, seed=c.seed, progress=False, device=args.device, eval_every=every),
                        evaluate=light_evaluation(split, images, mode) if every else None)
        result[f'{model_name}_train_s'] = time.perf_counter() - tic
        result[f'{model_name}_final_loss'] = float(np.mean(history['loss'][-20:]))
        result[f'{model_name}_curve'] = history.get('eval', [])
        result[model_name] = evaluate_toy_model(model.float().cpu().eval(), images, split, mode)
    result['margins'] = margins(result)
    return result


def worker(index: int, args, variants, deadline: float):
    import torch
    torch.set_num_threads(args.threads)
    for i, (name, overrides) in enumerate(variants):
        if i % args.processes != index: continue
        if time.time() > deadline: print(f'{name}: not started (time is up)', flush=True); continue
        try: result = run_variant(name, overrides, args)
        except Exception as e: result = {'name': name, 'error': f'{type(e).__name__}: {e}'}
        with open(Path(args.out) / f'results-{index}.jsonl', 'a') as f: f.write(json.dumps(result) + '\n')
        print(f"{name}: {'error ' + result['error'] if 'error' in result else 'done'}", flush=True)


def summary(rows) -> str:
    keys = [('fine_grained', 'text_to_image_R@1', 'fg T→I R@1'), ('fine_grained', 'text_to_image_R@5', 'fg T→I R@5'),
            ('long_caption', 'text_to_image_R@1', 'long T→I R@1'), ('localization', 'pointing_game', 'pointing')]
    lines = [f"{'variant':18s}" + ''.join(f'{label:>16s}' for *_, label in keys)
             + '   swaps shape/colour/size/position (FLAIR | baseline)']
    for r in rows:
        if 'error' in r: lines.append(f"{r['name']:18s} error: {r['error']}"); continue
        line = f"{r['name']:18s}" + ''.join(f"{r['flair'][s][k]:>8.3f}/{r['baseline'][s][k]:.3f}" for s, k, _ in keys)
        swaps = ['/'.join(f"{r[m]['attributes'][a]:.2f}" for a in ('shape', 'colour', 'size', 'position'))
                 for m in ('flair', 'baseline')]
        lines.append(line + '   ' + ' | '.join(swaps))
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sweep', choices=sorted(SWEEPS), default='settings')
    p.add_argument('--device', default='cuda'); p.add_argument('--processes', type=int, default=4)
    p.add_argument('--workers', type=int, default=3, help='loader processes per variant process')
    p.add_argument('--threads', type=int, default=2, help='torch threads per variant process (evaluation on the CPU)')
    p.add_argument('--out', default='runs/demo-sweep'); p.add_argument('--minutes', type=float, default=7.0)
    p.add_argument('--only', nargs='*', default=None, help='run only these variants')
    p.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE',
                   help='DemoConfig fields set in every variant, e.g. steps=100')
    args = p.parse_args(argv)
    common = {}
    for item in args.set:
        field, _, value = item.partition('=')
        if not value: raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. steps=100")
        try: common[field] = json.loads(value)      # numbers, true/false, lists
        except json.JSONDecodeError: common[field] = value
    variants = [(n, {**o, **common}) for n, o in SWEEPS[args.sweep] if args.only is None or n in args.only]
    if not variants: raise SystemExit(f"no variant selected; expected some of {[n for n, _ in SWEEPS[args.sweep]]}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    deadline, ctx = time.time() + 60 * args.minutes, get_context('spawn')
    procs = [ctx.Process(target=worker, args=(i, args, variants, deadline))
             for i in range(min(args.processes, len(variants)))]
    for proc in procs: proc.start()
    for proc in procs: proc.join()
    rows = [json.loads(line) for f in sorted(Path(args.out).glob('results-*.jsonl')) for line in open(f)]
    print(summary(rows))


if __name__ == '__main__':
    main()
