"""Reading time of each notebook, as the course path in nbs/index.ipynb (and the README) quotes it.

    python .ci/reading_times.py           # the estimate of every notebook, and the two totals
    python .ci/reading_times.py --check   # exit 1 if the index quotes other figures

An estimate, not a measurement: 200 words of prose and 15 lines of code a minute (directive lines `#| ...` and blank
lines not counted), rounded to 5 minutes, at least 5. A method notebook's course time counts its cells before the
one that says "The rest of this notebook" (the method and its exercises; `17_demo`: its lesson), apart from the whole
notebook. The short path is `flair_in_one_notebook` and the demo's lesson.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
PATH_END = 'The rest of this notebook'   # where a method notebook's course path ends
METHOD = ('00_tokenizer', '01_captions', '02_model', '04_losses', '12_retrieval', '14_localization', '15_pretrained',
          '17_demo')


def minutes(name: str, upto: str | None = None) -> int:
    "Estimated minutes to read notebook `name` (up to the first cell containing `upto`, if given)."
    cells = json.loads((NBS / f'{name}.ipynb').read_text(encoding='utf-8'))['cells']
    if upto: cells = cells[:next(i for i, c in enumerate(cells) if upto in ''.join(c['source']))]
    text = lambda c: ''.join(c['source'])
    words = sum(len(text(c).split()) for c in cells if c['cell_type'] == 'markdown')
    code = sum(1 for c in cells if c['cell_type'] == 'code'
               for line in text(c).splitlines() if line.strip() and not line.startswith('#|'))
    return max(5, int(5 * round((words / 200 + code / 15) / 5)))


def course_minutes(name: str) -> int:
    "What the course path counts for `name`: a method notebook up to its marker (if it has one), else all of it."
    cells = json.loads((NBS / f'{name}.ipynb').read_text(encoding='utf-8'))['cells']
    marked = name in METHOD and any(PATH_END in ''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    return minutes(name, PATH_END if marked else None)


def hours(m: int) -> str:
    return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min'


def estimates() -> dict:
    "{notebook: quoted reading time}, plus the totals of the method and the engineering notebooks."
    numbered = sorted(p.stem for p in NBS.glob('[0-9][0-9]_*.ipynb'))
    quoted = {n: f'{minutes(n)} min' for n in numbered}
    for n in METHOD:
        if course_minutes(n) != minutes(n):
            part = 'the lesson' if n == '17_demo' else 'the method and its exercises'
            quoted[n] = f"{course_minutes(n)} min ({part}); {minutes(n)} min in all"
    quoted['short path, in all'] = hours(minutes('flair_in_one_notebook') + course_minutes('17_demo'))
    quoted['method, in all'] = hours(sum(course_minutes(n) for n in METHOD))
    quoted['engineering, in all'] = hours(sum(minutes(n) for n in numbered if n not in METHOD))
    return quoted


def check() -> int:
    "0 if nbs/index.ipynb quotes every estimate; else name what differs."
    index = '\n'.join(''.join(c['source']) for c in json.loads((NBS / 'index.ipynb').read_text())['cells'])
    wrong = [f'{n}: {t}' for n, t in estimates().items()
             if (f'`{n}`](nbs/{n}.ipynb) | {t} |' if re.match(r'\d\d_', n)
                 else f'short path takes about {t} in all' if n.startswith('short') else t) not in index]
    if wrong: print('reading times in nbs/index.ipynb differ from these estimates:', *wrong, sep='\n  ')
    return 1 if wrong else 0


if __name__ == '__main__':
    if '--check' in sys.argv: sys.exit(check())
    for name, t in estimates().items(): print(f'{name:22s} {t}')
