"""Peak memory and time of FLAIR's loss, forward + backward, on the CPU in float32.

Only the loss side is measured: FLAIR's text-conditioned pooling layer (`visual_proj`: D = 512, 8 heads) on
synthetic projected embeddings (B images x 196 patch tokens, B*K texts), with the pooling over all
B*(K+B-1) downsampled pairs plus the multi-positive term. No ViT towers. Every configuration runs in a fresh
process; its time per step is the fastest of `--repeats` steps after a first one (wall clock and CPU
time of the process), and its peak memory is the growth of the peak resident set (ru_maxrss) over the resident set
just before the first step, with glibc's malloc told to return large blocks to the system at once.

    python benchmarks/loss_memory.py                 # B=128, K=8, D=512, L=196: the paper's per-GPU batch
    python benchmarks/loss_memory.py --batch 32      # a quicker look
"""
import argparse, json, os, resource, subprocess, sys, time

import torch

CONFIGS = {  # name: (chunk_size, recompute)
    'all pairs at once (baseline)': (None, True),
    'chunks of 16 images, no recomputation': (16, False),
    'chunk_size=64': (64, True), 'chunk_size=32': (32, True), 'chunk_size=16': (16, True), 'chunk_size=8': (8, True),
}


def rss_bytes() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def step(loss_fn, inputs):
    loss = loss_fn(**inputs)
    loss.backward()
    for t in inputs.values():
        if isinstance(t, torch.Tensor): t.grad = None
    return loss.item()


def measure(name, B, K, D, L, repeats, threads):
    "One configuration, in this (fresh) process: peak memory growth (bytes) and median seconds per step."
    from flair_min.model import TextConditionedPooling
    from flair_min import losses
    torch.set_num_threads(threads); torch.manual_seed(0)
    chunk_size, recompute = CONFIGS[name]
    pool = TextConditionedPooling(D, heads=8)
    leaf = lambda *shape: torch.randn(*shape).requires_grad_()
    inputs = dict(image_features=leaf(B, D), image_tokens=leaf(B, L, D), text_features=leaf(B * K, D),
                  logit_scale=torch.tensor(10.).requires_grad_(), logit_bias=torch.tensor(-10.).requires_grad_(),
                  visual_proj=pool, negative_offsets=losses.draw_negative_offsets(B, K))
    if not recompute:  # chunking without checkpoint: patch the chunk scorer to skip the recomputation
        losses.checkpoint = lambda fn, *args, use_reentrant: fn(*args)
    loss_fn = losses.FlairLoss(K, add_mps=True, chunk_size=chunk_size)
    before = rss_bytes()
    wall, cpu = [], []
    for _ in range(repeats + 1):  # the first step counts for the peak only
        t0, c0 = time.perf_counter(), time.process_time()
        value = step(loss_fn, inputs)
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB on Linux
    return dict(name=name, peak_bytes=peak, seconds=min(wall[1:]), cpu_seconds=min(cpu[1:]), loss=value)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=128); p.add_argument('--captions', type=int, default=8)
    p.add_argument('--dim', type=int, default=512); p.add_argument('--tokens', type=int, default=196)
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--one', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.captions, a.dim, a.tokens, a.repeats, a.threads))); return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    print(f"FLAIR loss forward+backward, CPU fp32, {a.threads} threads: B={a.batch}, K={a.captions}, D={a.dim}, "
          f"L={a.tokens}, {a.batch * (a.captions + a.batch - 1)} pooled pairs; "
          "pooling layer + synthetic embeddings only")
    rows = []
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, '--one', name, *sys.argv[1:]], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'configuration':40s} {'peak MiB':>9s} {'peak/base':>9s} {'s/step':>7s} "
          f"{'/base':>6s} {'CPU s':>6s} {'/base':>6s}  loss")
    for r in rows:
        print(f"{r['name']:40s} {r['peak_bytes'] / 2**20:9.0f} {r['peak_bytes'] / base['peak_bytes']:9.2f} "
              f"{r['seconds']:7.2f} {r['seconds'] / base['seconds']:6.2f} {r['cpu_seconds']:6.2f} "
              f"{r['cpu_seconds'] / base['cpu_seconds']:6.2f}  {r['loss']:.6f}")


if __name__ == '__main__':
    main()
