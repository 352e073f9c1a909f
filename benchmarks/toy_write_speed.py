"""How fast the toy world (09_toyworld) makes its training shards on the CPU.

    python benchmarks/toy_write_speed.py [--scenes 500] [--samples 20000] [--workers 2] [--out results/toy_write_speed]

Times the two halves of making a sample on `--scenes` scenes in this process, generating (`make_scene`: sampling,
drawing, sentences, masks) and JPEG encoding (`image_bytes`), in CPU time; then writes `--samples` samples as shards of
`--samples-per-shard` with `--workers` processes (`write_shards`) into a temporary folder, reading both the wall time
and the CPU time of all processes (the wall time depends on what else the machine runs; the CPU time much less).
Writes OUT.json and OUT.md.
"""
import argparse, resource, tempfile, time
from pathlib import Path

from flair_min.toyworld import image_bytes, make_scene, write_shards
from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    "CPU seconds (user + system) of this process and of its finished child processes so far."
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_write(n: int, **kwargs) -> tuple[float, float, int]:
    "Write `n` samples to a temporary folder: (wall seconds, CPU seconds of all processes, bytes written)."
    cpu, wall = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(tmp, n, **kwargs)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        size = sum(p.stat().st_size for p in paths)
    return wall, cpu, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scenes', type=int, default=500, help='scenes timed one by one (generation, encoding)')
    parser.add_argument('--samples', type=int, default=20_000, help='samples written as shards')
    parser.add_argument('--samples-per-shard', type=int, default=1000)
    parser.add_argument('--workers', type=int, default=2, help='processes writing shards')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'toy_write_speed'), help='writes OUT.json and OUT.md')
    args = parser.parse_args(argv)
    for s in [make_scene(args.scenes + i) for i in range(20)]: image_bytes(s.image)           # warm-up
    tic = time.process_time(); scenes = [make_scene(i) for i in range(args.scenes)]          # CPU time, like the
    make_ms = 1000 * (time.process_time() - tic) / args.scenes                              # shard-writing row
    tic = time.process_time(); [image_bytes(s.image) for s in scenes]
    jpeg_ms = 1000 * (time.process_time() - tic) / args.scenes
    wall, cpu, size = timed_write(args.samples, samples_per_shard=args.samples_per_shard, workers=args.workers)
    shards = -(-args.samples // args.samples_per_shard)
    result = dict(**run_facts('toy_write_speed.py', argv),
                  scenes=args.scenes, make_scene_ms=make_ms, jpeg_ms=jpeg_ms, make_scene_over_jpeg=make_ms / jpeg_ms,
                  samples=args.samples, shards=shards, workers=args.workers, write_wall_s=wall, write_cpu_s=cpu,
                  write_mib=size / 2**20)
    plural = lambda n, word: f'{n:,} {word}' + ('' if n == 1 else 'es' if word.endswith('s') else 's')
    per = f"{plural(args.samples, 'sample')} in {plural(shards, 'shard')}, {plural(args.workers, 'process')}"
    rows = [(f'`make_scene` (sample, draw, describe, mask), {args.scenes} scenes, one process: CPU time',
             make_ms * args.scenes / 1000, make_ms, make_ms / jpeg_ms),
            (f'JPEG encoding (`image_bytes`), {args.scenes} scenes, one process: CPU time',
             jpeg_ms * args.scenes / 1000, jpeg_ms, 1.0),
            (f'`write_shards`, {per}: CPU time of all processes', cpu, 1000 * cpu / args.samples,
             1000 * cpu / args.samples / jpeg_ms),
            (f'`write_shards`, {per}: wall time', wall, 1000 * wall / args.samples,
             1000 * wall / args.samples / jpeg_ms)]
    table = '\n'.join(['| measurement | seconds | ms per sample | relative to JPEG encoding |', '|---|---|---|---|',
                       *(f'| {name} | {s:.2f} | {ms:.3f} | {rel:.1f}× |' for name, s, ms, rel in rows)])
    write_results(args.out, result, 'Writing toy-world training shards on the CPU',
        f"{table}\n\nThe shards hold {size / 2**20:.1f} MiB of 64-pixel JPEGs (quality 95) and PixelProse-form json "
        "captions; a sample's CPU time covers generation, JPEG encoding and the tar writing.")


if __name__ == '__main__':
    main()
