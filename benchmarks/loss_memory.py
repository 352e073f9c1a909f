"""Peak memory and time of FLAIR's loss, one forward + backward pass, on the CPU in float32.

    python benchmarks/loss_memory.py --threads 1               # B=128, K=8, D=512, L=196: the paper's per-GPU batch
    python benchmarks/loss_memory.py --threads 1 --batch 32    # a quicker look
    python benchmarks/loss_memory.py ... --out results/loss_memory   # writes OUT.json and OUT.md (the default)

Only the loss side is measured: FLAIR's text-conditioned pooling layer (`visual_proj`: D = 512, 8 heads) on
synthetic projected embeddings (B images x L patch tokens, B*K texts), with the pooling over all B*(K+B-1)
downsampled pairs plus the multi-positive term (`FlairLoss(K)`, 04_losses). No ViT towers. Every configuration runs
in a fresh process; its time per step is the fastest of `--repeats` steps after a first one (wall clock and CPU time
of the process), and its peak memory is the growth of the peak resident set (ru_maxrss) over the resident set just
before the first step, with glibc's malloc told to return large blocks to the system at once. Every figure is also
given as a ratio to the first configuration (all pairs at once), measured in the same run.
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

import torch

from results_file import run_facts, write_results

ROOT = Path(__file__).resolve().parents[1]
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
    "One configuration, in this (fresh) process: peak memory growth (bytes) and fastest seconds per step."
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


def run_all(a) -> list[dict]:
    "Every configuration, each in a fresh process; with ratios to the first (the baseline)."
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    shape = ['--batch', a.batch, '--captions', a.captions, '--dim', a.dim, '--tokens', a.tokens,
             '--repeats', a.repeats, '--threads', a.threads]
    rows = []
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, '--one', name, *map(str, shape)], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['peak_bytes'] / 2**20:.0f} MiB, {rows[-1]['cpu_seconds']:.2f} CPU s", flush=True)
    base = rows[0]
    for r in rows:
        r.update(peak_ratio=r['peak_bytes'] / base['peak_bytes'], seconds_ratio=r['seconds'] / base['seconds'],
                 cpu_seconds_ratio=r['cpu_seconds'] / base['cpu_seconds'])
    return rows


TITLE = "FLAIR's loss, one forward + backward pass: peak memory and time (CPU, float32)"


def markdown(result: dict) -> str:
    "The body of the results note: table, two sentences."
    s, rows = result['setup'], result['rows']
    table = '\n'.join(f"| {r['name']} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_ratio']:.2f} | "
                      f"{r['cpu_seconds']:.2f} | {r['cpu_seconds_ratio']:.2f} | {r['seconds']:.2f} | "
                      f"{r['seconds_ratio']:.2f} |" for r in rows)
    spread = max(abs(r['loss'] - rows[0]['loss']) for r in rows)
    return f"""| configuration | peak memory (MiB) | × baseline | CPU time / step (s) | × baseline | \
wall time / step (s) | × baseline |
|---|---|---|---|---|---|---|
{table}

B = {s['batch']} images, K = {s['captions']}, D = {s['dim']}, L = {s['tokens']} patch tokens: the pooling layer scores \
{s['pairs']:,} downsampled pairs on synthetic embeddings (no ViT towers), each configuration in a fresh process, \
fastest of {s['repeats']} timed steps. Every configuration gives the same loss, {rows[0]['loss']:.5f} \
(largest difference {spread:.1e}).
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=128, help='images B (default: the paper\'s 128 per GPU)')
    p.add_argument('--captions', type=int, default=8, help='sub-captions K per image')
    p.add_argument('--dim', type=int, default=512, help='embedding width D')
    p.add_argument('--tokens', type=int, default=196, help='patch tokens L per image')
    p.add_argument('--repeats', type=int, default=3, help='timed steps after the first')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads (default: all cores)')
    p.add_argument('--out', default=str(ROOT / 'results' / 'loss_memory'), help='writes OUT.json and OUT.md')
    p.add_argument('--one', help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.captions, a.dim, a.tokens, a.repeats, a.threads))); return
    setup = dict(batch=a.batch, captions=a.captions, dim=a.dim, tokens=a.tokens, repeats=a.repeats,
                 pairs=a.batch * (a.captions + a.batch - 1))
    result = dict(**run_facts('loss_memory.py', argv, threads=a.threads), setup=setup, rows=run_all(a))
    write_results(a.out, result, TITLE, markdown(result))


if __name__ == '__main__':
    main()
