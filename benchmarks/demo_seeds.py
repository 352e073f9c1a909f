"""The default `flair-min demo` for several seeds, with its figures kept in results/demo/.

    python benchmarks/demo_seeds.py --seeds 0 1            # runs `flair-min demo --seed N --out runs/demo-seedN`
    python benchmarks/demo_seeds.py --seeds 0 1 --collect  # only collects runs already in runs/demo-seedN

For each seed it copies `table.txt` and `metrics.json` to results/demo/seedN/, the heatmap figure of the first seed
to results/demo/heatmaps.png (a 256-colour PNG, small enough for the README), and writes results/demo/README.md: the
command, the machine, the date, the wall time of each run and the headline figures (localization first) of every seed.
17_demo renders them from there.
"""
import argparse, json, os, platform, shutil, subprocess, sys, time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = [('localization', 'pointing_game', "pointing game, the model's map"),
            ('localization', 'pointing_game_attention', 'pointing game, attention'),
            ('localization', 'pointing_game_patch_cosine', 'pointing game, patch cosine'),
            ('segmentation', 'colour_best', 'segmentation mIoU, colours (best map, chosen on this split)'),
            ('segmentation', 'shape_best', 'segmentation mIoU, shapes (best map, chosen on this split)'),
            ('fine_grained', 'text_to_image_R@1', 'fine-grained T→I R@1'),
            ('fine_grained', 'text_to_image_R@5', 'fine-grained T→I R@5'),
            ('long_caption', 'text_to_image_R@1', 'long caption T→I R@1')]


def run(seed: int) -> Path:
    "Run the default demo for `seed` into runs/demo-seedN."
    out = ROOT / 'runs' / f'demo-seed{seed}'
    relative = str(out.relative_to(ROOT))                     # metrics.json records it: no path of this machine
    subprocess.run([sys.executable, '-m', 'flair_min.cli', 'demo', '--seed', str(seed), '--out', relative, '--quiet'],
                   check=True, cwd=ROOT)
    return out


def chance(metrics: dict, section: str, key: str) -> str:
    "The chance level of a headline row, or '' where there is none."
    f = metrics['flair']
    if section == 'localization': return f"{f['localization']['pointing_game_chance']:.3f}"
    if section == 'segmentation': return f"{f['segmentation'][key.split('_')[0] + '_chance']:.3f}"
    return ''


def note(seeds: list, runs: dict) -> str:
    "results/demo/README.md: how the figures were made, and the headline rows of every seed."
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {os.cpu_count()} cores'
    lines = ['### `flair-min demo`, default settings', '',
             f'Command: `flair-min demo --seed N --out runs/demo-seedN` for N in {seeds} '
             f'(collected by `python benchmarks/demo_seeds.py --seeds {" ".join(map(str, seeds))}`).',
             f'Machine: {device}, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}.',
             f'Date: {datetime.now(timezone.utc):%Y-%m-%d}. Files: `seedN/table.txt` (the printed table), '
             '`seedN/metrics.json` (every metric, settings, timings), `heatmaps.png` (seed '
             f'{seeds[0]}: FLAIR attention and baseline patch cosine over six object sentences).', '',
             '| row | ' + ' | '.join(f'seed {s}: FLAIR / baseline' for s in seeds) + ' | chance |',
             '|---|' + '---|' * (len(seeds) + 1)]
    for section, key, label in HEADLINE:
        cells = [f"{runs[s]['flair'][section][key]:.3f} / {runs[s]['baseline'][section][key]:.3f}" for s in seeds]
        lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {chance(runs[seeds[0]], section, key)} |')
    walls = ', '.join(f"seed {s}: {runs[s]['timings']['total_s'] / 60:.1f} min" for s in seeds)
    return '\n'.join(lines + ['', f'Wall time of each run (data, both trainings, evaluation, plots): {walls}.', ''])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--collect', action='store_true', help='collect runs/demo-seedN without running them')
    args = parser.parse_args(argv)
    out, runs = ROOT / 'results' / 'demo', {}
    for seed in args.seeds:
        run_dir = ROOT / 'runs' / f'demo-seed{seed}'
        if not args.collect:
            tic = time.perf_counter(); run(seed); print(f'seed {seed}: {time.perf_counter() - tic:.0f} s')
        (out / f'seed{seed}').mkdir(parents=True, exist_ok=True)
        for name in ('table.txt', 'metrics.json'): shutil.copy(run_dir / name, out / f'seed{seed}' / name)
        runs[seed] = json.loads((run_dir / 'metrics.json').read_text())
    heatmaps = Image.open(ROOT / 'runs' / f'demo-seed{args.seeds[0]}' / 'heatmaps.png').convert('RGB')
    heatmaps.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out / 'heatmaps.png', optimize=True)
    (out / 'README.md').write_text(note(args.seeds, runs))
    print((out / 'README.md').read_text())


if __name__ == '__main__':
    main()
