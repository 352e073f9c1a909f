"""Render the notebooks: run them on the CPU with fixed seeds and commit what they show.

    python .ci/render.py                      # every notebook in nbs/ (a few minutes on two cores)
    python .ci/render.py 02_model 04_losses   # only these
    python .ci/render.py --check              # CI: fail if a notebook's code changed since its outputs were made

Each notebook runs top to bottom in a fresh Jupyter kernel started in `nbs/`, as a reader would run it, except
cells flagged `#| gpu`, `#| slow` or `#| eval: false`: those are not run and keep the outputs they have (a GPU cell's
output comes from its last run on a GPU, and the notebook says so next to it). Before the first cell the kernel is
seeded (`random`, NumPy, torch), progress bars are switched off, and figures are drawn as PNG at a modest
resolution (72 dpi unless a figure asks for more). Outputs are then made steady: temporary folders are written as
`<tmp>`, wall times the CLI prints as `… s`, a stream's pieces are joined, and widgets (which need a live kernel:
`tqdm.auto` bars, the explorer of `14_localization`) are dropped, so a second render changes nothing.

The render records, for each notebook, a hash of its code cells and of the `results/` files they show in
`nbs/rendered.json`. `--check` recomputes the hashes and fails with "outputs stale: run .ci/render.py" when code or
a shown measurement changed after the last render, or when a notebook has no record. Markdown edits do not need a
new render.
"""
import argparse, hashlib, json, os, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
RECORD = NBS / 'rendered.json'
SKIP_FLAGS = ('gpu', 'slow')
STALE = 'outputs stale: run .ci/render.py'

SETUP = """\
import os, random
os.environ['TQDM_DISABLE'] = '1'
import numpy as np, torch, matplotlib
random.seed(0); np.random.seed(0); torch.manual_seed(0)
torch.set_num_threads(min(2, os.cpu_count() or 1))
%matplotlib inline
%config InlineBackend.figure_formats = ['png']
matplotlib.rcParams.update({'figure.dpi': 72, 'savefig.dpi': 'figure'})   # a figure may ask for more
"""


def directives(source: str) -> dict:
    "The `#| key: value` lines at the top of a cell, as a dict (a bare flag maps to '')."
    found = {}
    for line in source.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+)\s*:?\s*(.*)$', line)
        if not m: break
        found[m.group(1)] = m.group(2).strip()
    return found


def skipped(source: str) -> bool:
    "Whether the render (like `nbdev_test`) leaves this cell alone."
    d = directives(source)
    return any(f in d for f in SKIP_FLAGS) or d.get('eval', '').lower() == 'false'


def code_hash(nb_path: Path) -> str:
    "sha256 of the notebook's code cells (their source, in order) and of the results/ files they show."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    h = hashlib.sha256()
    for c in cells:
        if c['cell_type'] != 'code': continue
        source = ''.join(c['source'])
        h.update(source.encode() + b'\0')
        for name in sorted(set(re.findall(r"\.\./results/[\w./-]+", source))):
            shown = (NBS / name).resolve()
            h.update(name.encode() + b'\0' + (shown.read_bytes() if shown.is_file() else b'missing') + b'\0')
    return h.hexdigest()


def notebooks(names=()) -> list:
    "The notebooks to render: all of nbs/*.ipynb (scratch notebooks starting with _ excepted), or the named ones."
    every = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))
    if not names: return every
    chosen = []
    for n in names:
        hits = [p for p in every if p.stem == n or p.name == n or p.stem.startswith(n + '_')]
        if len(hits) != 1:
            sys.exit(f'render: {n!r} names {len(hits)} notebooks; expected one of {[p.stem for p in every]}')
        chosen += hits
    return chosen


VOLATILE = [(re.compile(r'(?:/private)?/(?:tmp|var/folders/[\w/]+?)/tmp[\w-]+'), '<tmp>'),  # tempfile folders
            (re.compile(r', \d+\.\d+ s$', re.M), ', … s')]                              # wall times the CLI prints


def steady(text: str) -> str:
    "`text` without what changes between runs or machines: this checkout's path, temporary folders, wall times."
    text = text.replace(str(ROOT) + '/', '').replace(str(ROOT), '.')
    for pattern, replacement in VOLATILE: text = pattern.sub(replacement, text)
    return text


WIDGET = 'application/vnd.jupyter.widget-view+json'   # a live widget: a new id every run, nothing without a kernel


def tidy(outputs: list) -> list:
    "Outputs without execution counts, widgets and what `steady` removes; a stream's pieces joined into one output."
    kept = []
    for o in outputs:
        o.pop('execution_count', None)
        if 'text' in o: o['text'] = steady(o['text'])
        data = o.get('data', {})
        if WIDGET in data: continue                     # a widget (a progress bar, an explorer) needs a live kernel
        for k, v in data.items():
            if k.startswith('text/') and isinstance(v, str): data[k] = steady(v)
        last = kept[-1] if kept else {}
        if o['output_type'] == 'stream' and last.get('output_type') == 'stream' and last['name'] == o['name']:
            last['text'] += o['text']
        else: kept.append(o)
    return kept


def render(nb_path: Path, timeout: int = 1200) -> dict:
    "Run one notebook in a fresh kernel in nbs/ and write its outputs back; returns a short report."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(NBS)}})
    ran, kept, start = 0, 0, time.time()
    with client.setup_kernel(env={**os.environ, 'TQDM_DISABLE': '1', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
                                  'PYTHONHASHSEED': '0', 'CUDA_VISIBLE_DEVICES': ''}):
        nb.cells.insert(0, nbformat.v4.new_code_cell(SETUP))      # nbclient stores each executed cell at its index
        client.execute_cell(nb.cells[0], 0)
        nb.cells.pop(0)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            if skipped(cell.source): kept += 1; continue
            cell.outputs = []
            client.execute_cell(cell, i)
            cell.outputs = tidy(cell.outputs)
            cell.execution_count = None
            ran += 1
    for cell in nb.cells:
        cell.get('metadata', {}).pop('execution', None)
    nbformat.write(nb, nb_path)
    return {'ran': ran, 'kept': kept, 'seconds': round(time.time() - start)}


def read_record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def check(paths: list) -> int:
    "0 if every notebook's code is what was rendered; else print the stale ones and return 1."
    record, stale = read_record(), []
    for p in paths:
        if record.get(p.name) != code_hash(p): stale.append(p.name)
    if stale:
        print(f'{STALE} ({", ".join(stale)})')
        return 1
    print(f'outputs current: {len(paths)} notebooks')
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('names', nargs='*', help='notebooks to render (default: all)')
    p.add_argument('--check', action='store_true', help='only check that outputs are current')
    args = p.parse_args(argv)
    paths = notebooks(args.names)
    if args.check: return check(paths)
    import subprocess
    for nb_path in paths:
        report = render(nb_path)
        print(f"{nb_path.name}: ran {report['ran']} cells, kept {report['kept']}, {report['seconds']} s", flush=True)
        subprocess.run(['nbdev_clean', '--fname', str(nb_path)], check=True, cwd=ROOT)
        record = read_record()
        record[nb_path.name] = code_hash(nb_path)
        RECORD.write_text(json.dumps(dict(sorted(record.items())), indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
