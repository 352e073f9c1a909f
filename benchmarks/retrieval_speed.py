"""Speed and memory of flair_min's retrieval scoring against the official per-image loop, on the CPU.

    python benchmarks/retrieval_speed.py [--images 256] [--texts 5000] [--topk 128] [--repeats 3]
                                         [--block 32] [--chunk-size 2048] [--threads T] [--out results/retrieval_speed]

Scores `images` × `texts` pairs at ViT-B/16 sizes (D = 512, L = 196 patch tokens) with a pooling
layer of random weights, on precomputed embeddings, in FLAIR mode and in top-k mode, with the
per-image loop (`per_image_scores` below, what the official evaluation does; 12_retrieval §1) and
with the chunked path (`score_embeddings`, the texts' queries prepared once beforehand, as
`retrieval_scores` does for a whole evaluation), all in the same run. The images are timed in blocks of
`block`, every variant on the same block in turn, `repeats` rounds, and a variant's time is the sum
of its best time per block: load from other jobs then hits all variants alike, so the ratios hold
on a busy machine even when the absolute numbers move. It also measures the CPU's float32
matrix-product rate (1024³ products, before every block; the best counts) and each variant's peak
memory above what the inputs occupy (Linux: the resident high-water mark, reset before each
variant, scoring all images at once).

Writes OUT.json (the data, with the command, machine, torch version, threads and date) and OUT.md (the table that
12_retrieval §5 shows); OUT defaults to results/retrieval_speed.
"""
import argparse, ctypes, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

from flair_min.model import TextConditionedPooling
from flair_min.retrieval import DEFAULT_CHUNK_SIZE, OUTSIDE_TOPK, pooling_weights, prepare_texts, score_embeddings
from results_file import run_facts, write_results

D, L, HEADS = 512, 196, 8
ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def per_image_scores(text_emb, global_emb, local, visual_proj, scale, mode: str = 'flair', topk: int = 128):
    "The official loop: image by image, the full pooling layer on all texts (or the image's top-k) → (B, N) scores."
    unit = F.normalize(text_emb.float(), dim=-1)                              # (N, D)
    rows = []
    for i in range(local.shape[0]):
        idx, queries = slice(None), text_emb                                  # all texts
        if mode == 'topk':
            idx = (F.normalize(global_emb[i].float(), dim=-1) @ unit.T).topk(min(topk, len(unit))).indices  # (k,)
            queries = text_emb[idx]                                           # (k, D)
        pooled = visual_proj(queries[None], local[i:i + 1], local[i:i + 1])[0].float()  # (N or k, D)
        row = torch.full((len(unit),), OUTSIDE_TOPK, device=unit.device)
        row[idx] = scale * (F.normalize(pooled, dim=-1) * unit[idx]).sum(-1)
        rows.append(row)
    return torch.stack(rows)                                                  # (B, N)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    "Best float32 GFLOP/s of an n × n × n matrix product."
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def timed(fn):
    start = time.perf_counter(); out = fn()
    return time.perf_counter() - start, out


def return_freed_memory_to_the_os():
    "glibc: serve large blocks by mmap and trim the heap, so a freed tensor leaves the resident set at once."
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD = 64 KiB (also stops the threshold from adapting)
        libc.mallopt(-1, 1 << 16)   # M_TRIM_THRESHOLD
    except OSError: pass


def resident_mb(field: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def peak_mb(fn) -> float:
    "Peak resident memory of fn() above the resident memory before it, in MiB (Linux only, else nan)."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')    # reset the high-water mark VmHWM
        before = resident_mb('VmRSS')
    except OSError: fn(); return float('nan')
    fn()
    return resident_mb('VmHWM') - before


def flops(mode: str, fast: bool, n_images: int, n_texts: int, k: int) -> float:
    "Floating-point operations of scoring images × texts (multiply-add = 2); the fast path's texts come prepared."
    per_pair = 4 * (L + 1) * D + 2 * D * D           # attention logits and values over L+1 slots, out_proj
    query = 2 * D * D                                  # ln_q → query projection of one text
    keys_values = 2 * 2 * L * D * D                    # key and value projections of one image
    pairs = n_images * (n_texts if mode == 'flair' else k)
    total = pairs * per_pair + n_images * keys_values + (0 if fast else pairs * query)
    return total + (n_images * 2 * n_texts * D if mode == 'topk' else 0)   # global cosines for choosing the top-k


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=256); p.add_argument('--texts', type=int, default=5000)
    p.add_argument('--topk', type=int, default=128); p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--block', type=int, default=32, help='images per timed block (variants alternate block by block)')
    p.add_argument('--chunk-size', type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own choice)')
    p.add_argument('--out', default=None, help='OUT.json and OUT.md are written (default: results/retrieval_speed)')
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    return_freed_memory_to_the_os()
    torch.manual_seed(0)
    pool = TextConditionedPooling(D, HEADS).eval()
    for param in pool.parameters(): torch.nn.init.normal_(param, std=0.05)
    n_images, n_texts, k = args.images, args.texts, min(args.topk, args.texts)
    text_emb, global_emb, local = torch.randn(n_texts, D), torch.randn(n_images, D), torch.randn(n_images, L, D)
    print(f"{torch.get_num_threads()} threads; {n_images} images × {n_texts:,} texts, D = {D}, L = {L}, top-k = {k}, "
          f"chunk {args.chunk_size:,} pairs; best of {args.repeats}", flush=True)

    blocks = [(i, min(i + args.block, n_images)) for i in range(0, n_images, args.block)]
    part = lambda i, j: (global_emb[i:j], local[i:j])
    queries = prepare_texts(text_emb, pooling_weights(pool))   # once per evaluation, as retrieval_scores does
    big = args.chunk_size * 4
    variants = {  # name: (mode, fast, fn(i, j) scoring images i..j-1)
        'FLAIR, per-image loop': ('flair', False,
                                  lambda i, j: per_image_scores(text_emb, *part(i, j), pool, 1.0, 'flair')),
        f'FLAIR, chunked ({args.chunk_size:,} pairs)': (
            'flair', True, lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'flair',
                                                         chunk_size=args.chunk_size)),
        f'FLAIR, chunked ({big:,} pairs)': (
            'flair', True, lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'flair', chunk_size=big)),
        'top-k, per-image loop': ('topk', False,
                                  lambda i, j: per_image_scores(text_emb, *part(i, j), pool, 1.0, 'topk', k)),
        f'top-k, batched ({args.chunk_size:,} pairs)': (
            'topk', True, lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'topk', k, args.chunk_size)),
        f'top-k, batched ({big:,} pairs)': (
            'topk', True, lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'topk', k, big)),
    }
    names = list(variants)
    outputs, memory = {}, {}
    for name, (*_, fn) in variants.items():                       # one untimed run each: warm-up, peak memory, outputs
        memory[name] = peak_mb(lambda: outputs.__setitem__(name, fn(0, n_images)))
    # Timing: block by block, every variant on the same block in turn, `repeats` rounds; a variant's time is the sum
    # over blocks of its best time on the block. Load from other jobs then hits all variants alike.
    block_times = {name: [[] for _ in blocks] for name in variants}
    rates, relative = [], {name: [] for name in variants}         # matmul rate before each block; GFLOP/s over it
    for _ in range(args.repeats):
        for b, (i, j) in enumerate(blocks):
            rates.append(matmul_gflops(1024, 3))
            for name, (mode, fast, fn) in variants.items():
                block_times[name][b].append(timed(lambda: fn(i, j))[0])
                relative[name].append(flops(mode, fast, j - i, n_texts, k) / block_times[name][b][-1] / 1e9
                                      / rates[-1])
    times = {name: sum(min(t) for t in per_block) for name, per_block in block_times.items()}
    median = lambda xs: sorted(xs)[len(xs) // 2]
    rate = max(rates)

    diff = {'flair': (outputs[names[1]] - outputs[names[0]]).abs().max().item(),
            'topk': (outputs[names[4]] - outputs[names[3]]).abs().max().item()}
    rows, speed = {}, {}
    for name, (mode, fast, _) in variants.items():
        pairs = n_images * (n_texts if mode == 'flair' else k)
        speed[name] = pairs / times[name]
        gflops = flops(mode, fast, n_images, n_texts, k) / times[name] / 1e9
        base = speed[names[0] if mode == 'flair' else names[3]]
        rows[name] = dict(mode=mode, pairs=pairs, seconds=times[name], pairs_per_s=speed[name], gflops=gflops,
                          pct_of_best_matmul=100 * gflops / rate,
                          pct_of_same_moment_matmul=100 * median(relative[name]),
                          peak_mib=memory[name], speedup=speed[name] / base,
                          work_ratio=flops(mode, False, n_images, n_texts, k) / flops(mode, fast, n_images, n_texts, k))
    result = dict(**run_facts('retrieval_speed.py', argv),
                  images=n_images, texts=n_texts, topk=k, embed_dim=D, local_tokens=L, heads=HEADS,
                  chunk_size=args.chunk_size, block=args.block, repeats=args.repeats,
                  matmul_gflops=rates, max_abs_diff_fast_vs_loop=diff, variants=rows,
                  all_pairs_at_once_mib=n_images * n_texts * D * 4 / 2 ** 20,
                  flop_per_pair={'fast': flops('flair', True, 1, 1, 0) - flops('flair', True, 1, 0, 0),
                                 'per_image_loop': flops('flair', False, 1, 1, 0) - flops('flair', False, 1, 0, 0)},
                  flop_per_image_keys_values=flops('flair', True, 1, 0, 0))
    write_results(args.out or ROOT / 'results' / 'retrieval_speed', result, TITLE, markdown(result))


TITLE = 'Retrieval scoring on the CPU: the fast path against the per-image loop'


def markdown(r: dict) -> str:
    "The body of the results note: table, two sentences."
    table = '\n'.join(
        f"| {name} | {v['pairs_per_s']:,.0f} | {v['gflops']:.1f} | {v['pct_of_best_matmul']:.0f}% / "
        f"{v['pct_of_same_moment_matmul']:.0f}% | {v['peak_mib']:.0f} | {v['speedup']:.2f}× | {v['work_ratio']:.2f}× |"
        for name, v in r['variants'].items())
    rates = r['matmul_gflops']
    header = (f"| variant ({r['images']} images × {r['texts']:,} texts, top-k {r['topk']}) | pairs/s | GFLOP/s "
              "| % of matmul (best / same moment) | peak MiB | speed-up | work ratio |\n|---|---|---|---|---|---|---|")
    return f"""{header}
{table}

The float32 matrix-product rate (1024³) was {min(rates):.0f}–{max(rates):.0f} GFLOP/s during the run; speed-ups are \
over the per-image loop of the same mode. Fast and loop scores differ by at most \
{r['max_abs_diff_fast_vs_loop']['flair']:.1e} (FLAIR) and {r['max_abs_diff_fast_vs_loop']['topk']:.1e} (top-k).
"""


if __name__ == '__main__':
    main()
