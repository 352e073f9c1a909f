"""Write README.md from nbs/index.ipynb (what `nbdev_readme` does, without needing Quarto).

Markdown cells are copied as they are; visible code cells become ```python blocks (directive lines
`#| ...` dropped; cells marked `#| hide` left out). `--check` exits 1 if README.md is out of date.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def render(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    parts = []
    for cell in cells:
        lines = ''.join(cell['source']).splitlines()
        if cell['cell_type'] == 'markdown': parts.append('\n'.join(lines).strip())
        elif cell['cell_type'] == 'code':
            if any(l.strip().replace(' ', '') in ('#|hide', '#|include:false') for l in lines): continue
            code = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip()
            if code: parts.append(f'```python\n{code}\n```')
    return ('<!-- generated from nbs/index.ipynb by .ci/readme.py; edit the notebook, not this file -->\n\n'
            + '\n\n'.join(p for p in parts if p) + '\n')

if __name__ == '__main__':
    text, readme = render(root / 'nbs' / 'index.ipynb'), root / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`')
    else: readme.write_text(text, encoding='utf-8')
