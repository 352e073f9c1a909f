"""The teaching edition: notebooks committed with current outputs, citing only what a reader has.

What a learner sees on GitHub or in Colab is the committed notebook, so these check the committed files:
outputs present, current (`.ci/render.py --check`), free of errors, progress bars and oversized figures;
references a reader can follow; one notation; the Colab badge and install cell.
"""
import base64, importlib.util, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))
NUMBERED = [p for p in NOTEBOOKS if re.match(r'\d\d_', p.name)]


def load_render():
    spec = importlib.util.spec_from_file_location('render', ROOT / '.ci' / 'render.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


def cells(path: Path) -> list:
    return json.loads(path.read_text(encoding='utf-8'))['cells']


def src(cell) -> str:
    return ''.join(cell['source'])


def output_text(cell) -> str:
    parts = []
    for o in cell.get('outputs', []):
        parts.append(''.join(o.get('text', '')))
        for k, v in o.get('data', {}).items():
            if k.startswith('text/'): parts.append(''.join(v))
    return '\n'.join(parts)


def test_outputs_are_current():
    "Every notebook's code is what `.ci/render.py` last ran (CI's staleness check)."
    stale = [p.name for p in NOTEBOOKS if render.read_record().get(p.name) != render.code_hash(p)]
    assert not stale, f'{render.STALE} ({", ".join(stale)})'


def test_check_fails_on_changed_code(tmp_path, monkeypatch):
    "The check notices a changed code cell, and does not mind a changed markdown cell."
    nb = json.loads(NOTEBOOKS[0].read_text(encoding='utf-8'))
    path = tmp_path / NOTEBOOKS[0].name
    path.write_text(json.dumps(nb))
    monkeypatch.setattr(render, 'RECORD', tmp_path / 'rendered.json')
    (tmp_path / 'rendered.json').write_text(json.dumps({path.name: render.code_hash(path)}))
    assert render.check([path]) == 0
    md = next(c for c in nb['cells'] if c['cell_type'] == 'markdown')
    md['source'] = ['A new sentence.\n'] + md['source']
    path.write_text(json.dumps(nb))
    assert render.check([path]) == 0
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    code['source'] = code['source'] + ['\n# changed']
    path.write_text(json.dumps(nb))
    assert render.check([path]) == 1


def test_check_follows_the_results_a_notebook_shows(tmp_path, monkeypatch):
    "A cell that shows a results/ file makes the notebook stale when that file changes."
    (tmp_path / 'nbs').mkdir(); (tmp_path / 'results').mkdir()
    shown = tmp_path / 'results' / 'speed.md'
    shown.write_text('| a | 1 |')
    nb = {'cells': [{'cell_type': 'code', 'source': ["Markdown(Path('../results/speed.md').read_text())"]}]}
    path = tmp_path / 'nbs' / 'x.ipynb'
    path.write_text(json.dumps(nb))
    monkeypatch.setattr(render, 'NBS', tmp_path / 'nbs')
    monkeypatch.setattr(render, 'RECORD', tmp_path / 'nbs' / 'rendered.json')
    render.RECORD.write_text(json.dumps({path.name: render.code_hash(path)}))
    assert render.check([path]) == 0
    shown.write_text('| a | 2 |')
    assert render.check([path]) == 1


def test_tidy_makes_outputs_steady():
    "Temporary folders, CLI wall times and live widgets go; a stream's pieces become one output."
    outputs = [{'output_type': 'stream', 'name': 'stdout', 'text': 'saved /tmp/tmpab12_x/run.pt\n'},
               {'output_type': 'stream', 'name': 'stdout', 'text': 'coco: 6 images, topk scoring, 0.02 s\n'},
               {'output_type': 'display_data', 'data': {render.WIDGET: {'model_id': 'f00'}, 'text/plain': '0%|'}}]
    tidied = render.tidy(outputs)
    assert tidied == [{'output_type': 'stream', 'name': 'stdout',
                       'text': 'saved <tmp>/run.pt\ncoco: 6 images, topk scoring, … s\n'}]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_outputs(path):
    "Outputs are there, with no errors, no progress bars, no paths of the machine that rendered them, small figures."
    cs = [c for c in cells(path) if c['cell_type'] == 'code']
    ran = [c for c in cs if not render.skipped(src(c))]
    assert any(c.get('outputs') for c in ran), f'{path.name}: no outputs committed; run .ci/render.py'
    for c in cs:
        for o in c.get('outputs', []):
            assert o['output_type'] != 'error', f'{path.name}: an error output in {src(c)[:80]!r}'
            text = ''.join(o.get('text', '')) + ''.join(''.join(v) for k, v in o.get('data', {}).items()
                                                         if k.startswith('text/'))
            assert render.WIDGET not in o.get('data', {}), f'{path.name}: a live widget in {src(c)[:80]!r}'
            bar = '\r' in text or re.search(r'\d+%\|', text)
            assert not bar, f'{path.name}: a progress bar in {src(c)[:80]!r}'
            assert '/work/' not in text and '/tmp/' not in text, f'{path.name}: a machine path in {text[:120]!r}'
            png = o.get('data', {}).get('image/png')
            if png: assert len(base64.b64decode(''.join(png))) < 250_000, f'{path.name}: a figure over 250 kB'
        if render.skipped(src(c)) and c.get('outputs'):
            assert 'gpu' in render.directives(src(c)), f'{path.name}: a skipped non-GPU cell keeps outputs'


def test_gpu_outputs_are_labelled():
    "A GPU cell that keeps the output of its last GPU run has a note next to it saying which run."
    for path in NOTEBOOKS:
        cs = cells(path)
        for i, c in enumerate(cs):
            if c['cell_type'] == 'code' and 'gpu' in render.directives(src(c)) and c.get('outputs'):
                near = ' '.join(src(x) for x in cs[max(0, i - 1):i + 2] if x['cell_type'] == 'markdown')
                assert 'last GPU run' in near, f'{path.name}: GPU output without a "last GPU run" note'


FORBIDDEN = [r'flair_spec', r'\bthe spec\b', r'\bspec\b', r'\bone-off\b', r'\bnot kept\b', r'development machine',
             r'\bthe issue\b', r'\bissue (asked|says|lists)\b']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_references_a_reader_can_follow(path):
    "No pointers to documents, issues, machines or scripts the reader does not have (sources and outputs)."
    for c in cells(path):
        text = (src(c) + '\n' + output_text(c)).lower()
        for pattern in FORBIDDEN:
            assert not re.search(pattern, text), f'{path.name}: {pattern!r} in {src(c)[:100]!r}'
        for m in re.finditer(r'\bissues?\b', text):
            around = text[max(0, m.start() - 60):m.end() + 60]
            assert 'github' in around or 'issue #' in around, f'{path.name}: "issue" in {around!r}'


def math_of(path: Path) -> list:
    return [m for c in cells(path) if c['cell_type'] == 'markdown' for m in re.findall(r'\$\$?([^$]+)\$\$?', src(c))]


# Symbols the notation table (nbs/index.ipynb) gives one meaning, and the ways notebooks once gave them another.
REDEFINED = {
    r'(?<![\\\w])u\s*\\leftarrow|(?<![\\\w])u_\{?i[,\\}]|(?<![\\\w])u_\{?i\\ell|(?<![\\\w])u_[ic]\s*=|(?<![\\\w])u_\{ic':
        'u is a sentence of a long caption only (r: the residual stream; bars: tower outputs; w: pooling values)',
    r'(?<![\\\w])a\^\{\(h\)\}|(?<![\\\w])a_\{ic|(?<![\\\w])\w*\(a\)':
        'a is a sentence index only (attention weights are alpha)',
    r'\\kappa_\{?i|\\kappa\^': 'keys are k_{i,l}; kappa is a class index',
    r'W_\{?(\\mathrm\s*\{?\s*)?[qkv]\}?\}?\s*(\\,)?\s*\\(operatorname|mathrm)\{\s*LN':
        'the pooling projections are row vectors: LN_q(t_c) W_q^T, not W_q LN_q(t_c)',
    r'C_\{cc|\^\{?C\}?(?![\w])|\\frac\{1\}\{C\}|\\text\{IoU\}_c(?![\w])':
        'C is the confusion matrix; n_C the number of classes, kappa a class index',
}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_one_notation(path):
    "One symbol, one meaning: M is no symbol, the scale is e^s, and no notebook redefines a symbol of the table."
    for m in math_of(path):
        assert not re.search(r'(?<![\\\w])M(?![\w])', m), f'{path.name}: the symbol M in ${m}$'
        assert 'logit\\_scale' not in m and 'logit_scale' not in m, f'{path.name}: write e^s, not ${m}$'
        for pattern, meaning in REDEFINED.items():
            assert not re.search(pattern, m), f'{path.name}: ${m[:80]}$ — {meaning}'
    for c in cells(path):
        assert not re.search(r'keys\s*=\s*values', src(c)), f'{path.name}: keys and values are two projections'


def test_one_notation_catches_redefinitions():
    "Each forbidden form is caught (the forms the notebooks used before the notation was made one)."
    old = [r'u \leftarrow u + \operatorname{Attn}(u)', r'u_{i,0}, \dots, u_{i,L}', r'u_c = \operatorname{LN}(x)',
           r'u_{i\ell}', r'a^{(h)}_{ic\ell}', r'a_{ic,L+1}', r'\operatorname{MLP}(a)', r'\kappa_{i\ell}',
           r'q_c = W_{\mathrm q}\,\mathrm{LN}_{\mathrm q}(t_c)', r'C_{cc\'}', r'\text{IoU}_c = 1',
           r'\frac{1}{C}\sum_c']
    for m in old: assert any(re.search(p, m) for p in REDEFINED), m
    for m in [r'u_{a_1}, u_{a_1+1}', r'u_0, \dots, u_{n-1}', r'\alpha^{(h)}_{ic,\ell}', r't_\kappa', r'k_{i,\ell}',
              r'q_c = \operatorname{LN}_q(t_c)\,W_q^\top + \beta_q', r'\text{IoU}_\kappa', r'\frac{1}{n_C}']:
        assert not any(re.search(p, m) for p in REDEFINED), m


def test_notation_table_in_index():
    text = '\n'.join(src(c) for c in cells(NBS / 'index.ipynb'))
    assert '## Notation' in text and '| $e^s$' not in text
    for symbol in ('$B$', '$K$', '$N$', '$L$', '$D$', '$s$', '$b$', '$m$, $m_{\\max}$', '$N_I$, $N_T$', '$v_{ic}$'):
        assert f'| {symbol} |' in text, f'notation table lacks {symbol}'
    assert '## A course path' in text and 'min' in text


@pytest.mark.parametrize('path', NUMBERED, ids=lambda p: p.stem)
def test_open_in_colab(path):
    "A badge that opens this very notebook from the repository, and an install cell that only runs in Colab."
    cs = cells(path)
    url = f'https://colab.research.google.com/github/flair-min/flair_min/blob/main/nbs/{path.name}'
    assert any(url in src(c) for c in cs[:4] if c['cell_type'] == 'markdown'), f'{path.name}: no Colab badge'
    install = [c for c in cs if c['cell_type'] == 'code' and "'google.colab' in sys.modules" in src(c)]
    assert len(install) == 1 and render.skipped(src(install[0])), f'{path.name}: no Colab install cell'
    assert 'git clone' in src(install[0]) and 'nbs' in src(install[0])


def test_reading_times_are_the_estimates():
    "The course path quotes what `.ci/reading_times.py` estimates from the notebooks as they are."
    spec = importlib.util.spec_from_file_location('reading_times', ROOT / '.ci' / 'reading_times.py')
    reading_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reading_times)
    assert reading_times.check() == 0, 'reading times are stale: see python .ci/reading_times.py'


def test_flair_in_one_notebook_stands_alone():
    """The short path's notebook: at most 300 code lines, only torch, numpy, PIL, matplotlib, the standard library and
    flair_min's toy world and tokenizer; it exports nothing and comes first in the course path."""
    import sys
    path = NBS / 'flair_in_one_notebook.ipynb'
    code = [line for c in cells(path) if c['cell_type'] == 'code' for line in src(c).splitlines()]
    assert len([x for x in code if x.strip() and not x.startswith('#|')]) <= 300
    assert not [x for x in code if re.match(r'#\|\s*(default_exp|export)', x)]
    allowed = {'torch', 'numpy', 'PIL', 'matplotlib', 'flair_min.toyworld', 'flair_min.tokenizer'}
    for line in code:
        m = re.match(r'\s*(?:from\s+(\S+)\s+import|import\s+(.+))', line)
        if not m: continue
        for name in ([m.group(1)] if m.group(1) else [x.split(' as ')[0].strip() for x in m.group(2).split(',')]):
            top = name.split('.')[0]
            assert top in sys.stdlib_module_names or top in allowed or name in allowed, f'imports {name}'
    index = '\n'.join(src(c) for c in cells(NBS / 'index.ipynb'))
    course = index[index.index('## A course path'):]
    assert course.index('flair_in_one_notebook') < course.index('00_tokenizer')


@pytest.mark.parametrize('stem', ['00_tokenizer', '01_captions', '02_model', '04_losses', '12_retrieval',
                                  '14_localization'])
def test_method_notebooks_end_with_checked_exercises(stem):
    "3 to 5 exercises, each with a visible cell that leaves the check to the reader and a hidden, collapsed solution"
    cs = cells(NBS / f'{stem}.ipynb')
    marker = next(i for i, c in enumerate(cs) if src(c).startswith('The rest of this notebook is engineering:'))
    numbers = [int(m) for c in cs[:marker] if c['cell_type'] == 'markdown'
               for m in re.findall(r'\*\*Exercise (\d+)\.\*\*', src(c))]
    assert 3 <= len(numbers) <= 5 and numbers == list(range(1, len(numbers) + 1)), numbers
    for n in numbers:
        hidden = [c for c in cs[:marker] if f'def check_exercise_{n}(' in src(c)]
        assert len(hidden) == 1 and src(hidden[0]).startswith('#| hide'), f'{stem}: exercise {n} solution'
        assert hidden[0]['metadata'].get('jupyter', {}).get('source_hidden') is True, f'{stem}: {n} not collapsed'
        assert re.search(rf'^check_exercise_{n}\(\*?_solution', src(hidden[0]), re.M), f'{stem}: {n} unchecked'
        assert re.search(rf'test_fail\(.*check_exercise_{n}\(', src(hidden[0])), f'{stem}: {n} checker never refuses'
        assert any(f'# check_exercise_{n}(' in src(c) for c in cs[:marker] if not src(c).startswith('#| hide'))
