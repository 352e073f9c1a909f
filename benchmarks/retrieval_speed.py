"""Speed and memory of flair_min's retrieval scoring against the official per-image loop, on the CPU.

    python benchmarks/retrieval_speed.py [--images 256] [--texts 5000] [--topk 128] [--repeats 3]
                                         [--block 32] [--chunk-size 2048] [--threads T]

Scores `images` × `texts` pairs at ViT-B/16 sizes (D = 512, L = 196 patch tokens) with a pooling
layer of random weights, on precomputed embeddings, in FLAIR mode and in top-k mode, with the
per-image loop (`flair_min.retrieval.per_image_scores`, what the official evaluation does) and
with the chunked path (`score_embeddings`, the texts' queries prepared once beforehand, as
`retrieval_scores` does for a whole evaluation), all in the same run. The images are timed in blocks of
`block`, every variant on the same block in turn, `repeats` rounds, and a variant's time is the sum
of its best time per block: load from other jobs then hits all variants alike, so the ratios hold
on a shared machine even when the absolute numbers move. It also measures the CPU's float32
matrix-product rate (1024³ products, before every block; the best counts) and each variant's peak
memory above what the inputs occupy (Linux: the resident high-water mark, reset before each
variant, scoring all images at once).
"""
import argparse, ctypes, time

import torch

from flair_min.model import TextConditionedPooling
from flair_min.retrieval import DEFAULT_CHUNK_SIZE, per_image_scores, pooling_weights, prepare_texts, score_embeddings

D, L, HEADS = 512, 196, 8


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


def flops(mode: str, fast: bool, M: int, N: int, k: int) -> float:
    "Floating-point operations of scoring M images × N texts (multiply-add = 2); the fast path's texts come prepared."
    per_pair = 4 * (L + 1) * D + 2 * D * D           # attention logits and values over L+1 slots, out_proj
    query = 2 * D * D                                  # ln_q → query projection of one text
    keys_values = 2 * 2 * L * D * D                    # key and value projections of one image
    pairs = M * (N if mode == 'flair' else k)
    total = pairs * per_pair + M * keys_values + (0 if fast else pairs * query)
    return total + (M * 2 * N * D if mode == 'topk' else 0)   # global cosines for choosing the top-k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=256); p.add_argument('--texts', type=int, default=5000)
    p.add_argument('--topk', type=int, default=128); p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--block', type=int, default=32, help='images per timed block (variants alternate block by block)')
    p.add_argument('--chunk-size', type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    return_freed_memory_to_the_os()
    torch.manual_seed(0)
    pool = TextConditionedPooling(D, HEADS).eval()
    for param in pool.parameters(): torch.nn.init.normal_(param, std=0.05)
    M, N, k = args.images, args.texts, args.topk
    text_emb, global_emb, local = torch.randn(N, D), torch.randn(M, D), torch.randn(M, L, D)
    print(f"{torch.get_num_threads()} threads; {M} images × {N:,} texts, D = {D}, L = {L}, top-k = {k}, "
          f"chunk {args.chunk_size:,} pairs; best of {args.repeats}", flush=True)

    blocks = [(i, min(i + args.block, M)) for i in range(0, M, args.block)]
    part = lambda i, j: (global_emb[i:j], local[i:j])
    queries = prepare_texts(text_emb, pooling_weights(pool))   # once per evaluation, as retrieval_scores does
    variants = {  # name: (mode, fast, fn(i, j) scoring images i..j-1)
        'flair, per-image loop': ('flair', False,
                                  lambda i, j: per_image_scores(text_emb, *part(i, j), pool, 1.0, 'flair')),
        'flair, chunked': ('flair', True, lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'flair',
                                                                         chunk_size=args.chunk_size)),
        'flair, chunked (chunk×4)': ('flair', True,
                                     lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'flair',
                                                                   chunk_size=args.chunk_size * 4)),
        'top-k, per-image loop': ('topk', False,
                                  lambda i, j: per_image_scores(text_emb, *part(i, j), pool, 1.0, 'topk', k)),
        'top-k, batched': ('topk', True,
                           lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'topk', k, args.chunk_size)),
        'top-k, batched (chunk×4)': ('topk', True,
                                     lambda i, j: score_embeddings(*part(i, j), queries, pool, 1.0, 'topk', k,
                                                                   args.chunk_size * 4)),
    }
    outputs, memory = {}, {}
    for name, (*_, fn) in variants.items():                       # one untimed run each: warm-up, peak memory, outputs
        memory[name] = peak_mb(lambda: outputs.__setitem__(name, fn(0, M)))
    # Timing: block by block, every variant on the same block in turn, `repeats` rounds; a variant's time is the sum
    # over blocks of its best time on the block. Load from other jobs then hits all variants alike.
    block_times = {name: [[] for _ in blocks] for name in variants}
    rates, relative = [], {name: [] for name in variants}         # matmul rate before each block; GFLOP/s over it
    for _ in range(args.repeats):
        for b, (i, j) in enumerate(blocks):
            rates.append(matmul_gflops(1024, 3))
            for name, (mode, fast, fn) in variants.items():
                block_times[name][b].append(timed(lambda: fn(i, j))[0])
                relative[name].append(flops(mode, fast, j - i, N, min(k, N)) / block_times[name][b][-1] / 1e9
                                      / rates[-1])
    times = {name: sum(min(t) for t in per_block) for name, per_block in block_times.items()}
    median = lambda xs: sorted(xs)[len(xs) // 2]
    rate = max(rates)
    print(f"float32 matmul (1024³), best of the run: {rate:.1f} GFLOP/s (median {median(rates):.0f})")

    diff_flair = (outputs['flair, chunked'] - outputs['flair, per-image loop']).abs().max().item()
    diff_topk = (outputs['top-k, batched'] - outputs['top-k, per-image loop']).abs().max().item()
    print(f"max |chunked − per-image loop|: flair {diff_flair:.1e}, top-k {diff_topk:.1e}\n")
    header = (f"{'variant':26s}{'pairs':>11s}{'time s':>9s}{'pairs/s':>11s}{'GFLOP/s':>9s}{'% best':>8s}{'% same':>8s}"
              f"{'peak MiB':>10s}{'speed-up':>10s}{'FLOP ratio':>12s}")
    print(header); print('-' * len(header))
    speed = {}
    for name, (mode, fast, _) in variants.items():
        best, pairs = times[name], M * (N if mode == 'flair' else min(k, N))
        speed[name] = pairs / best
        gflops = flops(mode, fast, M, N, min(k, N)) / best / 1e9
        base = speed['flair, per-image loop' if mode == 'flair' else 'top-k, per-image loop']
        # the speed-up at equal efficiency
        work_ratio = flops(mode, False, M, N, min(k, N)) / flops(mode, fast, M, N, min(k, N))
        print(f"{name:26s}{pairs:11,d}{best:9.2f}{speed[name]:11,.0f}{gflops:9.1f}{100 * gflops / rate:7.0f}%"
              f"{100 * median(relative[name]):7.0f}%{memory[name]:10.0f}{speed[name] / base:9.2f}×{work_ratio:11.2f}×")
    unchunked = M * N * D * 4 / 2 ** 20
    print("% best: GFLOP/s over the best matmul rate of the run; "
          "% same: median over blocks of the block's GFLOP/s over the matmul rate measured just before it")
    keys_values = flops('flair', True, 1, 0, 0)
    print(f"\nFLOP per pair: chunked {flops('flair', True, 1, 1, 0) - keys_values:,.0f}, per-image loop "
          f"{flops('flair', False, 1, 1, 0) - keys_values:,.0f}; "
          f"per image (key and value projections) {keys_values:,.0f}")
    print(f"pooled vectors of all {M} × {N:,} pairs at once would take {unchunked:,.0f} MiB")
    print(f"top-k batched vs the FLAIR-mode per-image loop, time per image: "
          f"{times['flair, per-image loop'] / times['top-k, batched']:.1f}× faster")


if __name__ == '__main__':
    main()
