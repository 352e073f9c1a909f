"""The toy model flair_min ships: the default `flair-min demo` FLAIR (seed 0), saved in half precision, and measured.

    python benchmarks/toy_model.py              # train (about 5 min on 2 cores), save, measure
    python benchmarks/toy_model.py --measure    # only measure the file already in flair_min/assets/

It trains exactly the FLAIR half of `flair-min demo` (DemoConfig(): seed 0, 4,000 training scenes, 1,600 steps;
`train_demo_model`, 17_demo), writes its weights as float16 to flair_min/assets/flair-toy.pt (what
`create_model_and_transforms('FLAIR-toy', pretrained='toyworld')` loads, 15_pretrained), then loads that file back
through the released-weights API and measures it on fresh toy scenes: an evaluation split of its own seed (20,000:
neither the training scenes nor the demo's held-out split), with 16_toy_eval's metrics and their chance levels.
Deterministic from the seed on one machine (same torch, same thread count). Writes results/toy_model.{json,md}.
"""
import argparse, sys
from pathlib import Path

import torch

from flair_min.checkpoint import save_checkpoint
from flair_min.demo import DemoConfig, demo_model_config, make_demo_loader, prepare_toy_data, train_demo_model
from flair_min.pretrained import create_model_and_transforms, get_pretrained_cfg
from flair_min.toy_eval import eval_images, localization_results, retrieval_results
from flair_min.toyworld import ToyWorldConfig, make_eval_split
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED, EVAL_SCENES = 20_000, 500


def train_and_save(path: Path, out: Path) -> None:
    "Train the demo's FLAIR with DemoConfig() and save its weights in float16 at `path`."
    config = DemoConfig(out=str(out), progress=False, plots=False)
    shards, _ = prepare_toy_data(config)
    model, history = train_demo_model('flair', make_demo_loader(shards, config), config)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(half, path)
    print(f"trained {config.steps} steps (loss {history['loss'][0]:.2f} -> {history['loss'][-1]:.2f}); "
          f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@torch.no_grad()
def measure() -> dict:
    "The shipped model, loaded as a user loads it, on fresh scenes: retrieval and the pointing game, with chance."
    model, _, _ = create_model_and_transforms('FLAIR-toy', pretrained='toyworld')
    model.eval()
    split = make_eval_split(EVAL_SCENES, ToyWorldConfig(image_size=model.config.image_size), seed=EVAL_SEED)
    images = eval_images(split)
    retrieval = {mode: retrieval_results(model, images, split, mode) for mode in ('flair', 'global')}
    return {'retrieval': retrieval, 'localization': localization_results(model, images, split),
            'scenes': len(images)}


def table(m: dict) -> str:
    "The note's table: long-caption and fine-grained retrieval both ways, pointing game per map, chance levels."
    n, rows = m['scenes'], []
    for group in ('long_caption', 'fine_grained'):
        for d, arrow in (('text_to_image', 'T→I'), ('image_to_text', 'I→T')):
            for k in (1, 5):
                f, g = (m['retrieval'][mode][group][f'{d}_R@{k}'] for mode in ('flair', 'global'))
                rows.append(f"| {group.replace('_', ' ')} {arrow} R@{k} | {f:.3f} | {g:.3f} | {min(1, k / n):.3f} |")
    loc = m['localization']
    rows += [f"| pointing game, {kind.replace('_', ' ')} | {loc[f'pointing_game_{kind}']:.3f} | | "
             f"{loc['pointing_game_chance']:.3f} |" for kind in ('attention', 'patchwise', 'patch_cosine')]
    return '\n'.join(['| metric | FLAIR way | CLIP way | chance |', '|---|---|---|---|', *rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--measure', action='store_true', help='only measure flair_min/assets/flair-toy.pt')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'toy_model'))
    args = parser.parse_args(argv)
    path = Path(get_pretrained_cfg('FLAIR-toy', 'toyworld')['path'])
    torch.manual_seed(0)
    if not args.measure: train_and_save(path, ROOT / 'runs' / 'toy-model')
    assert create_model_and_transforms('FLAIR-toy', pretrained='toyworld')[0].config == demo_model_config(DemoConfig())
    m = measure()
    result = {**run_facts('toy_model.py', argv), 'file_mib': round(path.stat().st_size / 2**20, 2),
              'eval_seed': EVAL_SEED, **m}
    chance = ("Chance: R@k = k / N for N = {n} images (long captions: one per image; fine-grained: the object "
              "sentences true of exactly one image, ranked among all {n} images); the pointing game's chance is the "
              "share of the patch grid the named object touches.").format(n=m['scenes'])
    body = (f"`flair_min/assets/flair-toy.pt` ({result['file_mib']} MiB, float16), loaded with "
            f"`create_model_and_transforms('FLAIR-toy', pretrained='toyworld')`, on {m['scenes']} fresh toy scenes "
            f"(evaluation seed {EVAL_SEED}). FLAIR way: every text pools every image; CLIP way: global embeddings."
            f"\n\n{table(m)}\n\n{chance}\n")
    write_results(args.out, result, "The shipped toy model on fresh toy scenes", body)


if __name__ == '__main__':
    sys.exit(main())
