"""CI's first stage: what a user gets from the README's install command, checked in that environment alone.

Run it with the Python of a clean virtual environment into which only the README's install command
(`pip install -e .`, no extras) has installed flair_min. It checks that

1. every flair_min module imports;
2. `flair-min --help` and `flair-min <job> --help` work for every job;
3. a tiny `flair-min demo` runs (a few steps on a few hundred toy scenes);
4. every module that a notebook code cell or the library imports resolves here: a reader who runs a
   notebook after its Colab install cell has exactly these packages (Jupyter's and Colab's own modules aside).

Each failure is printed with what to fix; the exit status is 1 if any check failed.

    python .ci/user_install.py                    # all four checks
    python .ci/user_install.py imports            # only the fourth (seconds)
    python .ci/user_install.py install-command    # print the README's install command (what .ci/run runs)
"""
import argparse, ast, importlib, importlib.util, json, pkgutil, re, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules a notebook may import that the notebook's own host provides: Jupyter (a kernel runs IPython) and Colab.
HOST_MODULES = {'IPython', 'ipykernel', 'google'}
TINY_DEMO = ['demo', '--quick', '--steps', '3', '--train-scenes', '200', '--eval-scenes', '48', '--batch-size', '8',
             '--no-plots', '--quiet']


def install_command() -> str:
    "The README's install command: the part before `&&` of the shell line that runs `flair-min demo`."
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    lines = [line for line in readme.splitlines() if 'flair-min demo' in line and '&&' in line]
    if len(lines) != 1: raise SystemExit(f"README.md: expected one `<install> && flair-min demo` line, found {lines}")
    return lines[0].split('&&')[0].strip()


def code_of(cell_source: str) -> str:
    "A notebook cell's code as Python: each shell (`!`) or magic (`%`) line becomes `pass`, indentation kept."
    lines = []
    for line in cell_source.splitlines():
        body = line.lstrip()
        lines.append(line[:len(line) - len(body)] + 'pass' if body.startswith(('!', '%')) else line)
    return '\n'.join(lines)


def imported_modules(source: str, where: str) -> dict:
    "{top-level module: where} for every absolute import in `source` (inside functions too)."
    found = {}
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: names = [node.module]
        else: continue
        for name in names: found.setdefault(name.split('.')[0], where)
    return found


def project_imports() -> dict:
    "{module: first place importing it} over flair_min/*.py and the code cells of nbs/*.ipynb."
    found = {}
    for path in sorted((ROOT / 'flair_min').glob('*.py')):
        found = {**imported_modules(path.read_text(encoding='utf-8'), str(path.relative_to(ROOT))), **found}
    for nb in sorted((ROOT / 'nbs').glob('*.ipynb')):
        for n, cell in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
            if cell['cell_type'] != 'code': continue
            where = f'{nb.relative_to(ROOT)} cell {n}'
            found = {**imported_modules(code_of(''.join(cell['source'])), where), **found}
    return found


def check_imports() -> list[str]:
    "The modules the project imports that do not resolve in this environment, each with where it is imported."
    missing = []
    for module, where in sorted(project_imports().items()):
        if module in sys.stdlib_module_names or module in HOST_MODULES or module == 'flair_min': continue
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} (imported in {where}) is not installed by the README's install command: "
                           f"add its package to `requirements` in settings.ini, or stop importing it there")
    return missing


def check_modules() -> list[str]:
    "The flair_min modules that fail to import, with the error."
    failed = []
    try: import flair_min
    except Exception as e: return [f"import flair_min failed: {type(e).__name__}: {e}"]
    for info in pkgutil.iter_modules(flair_min.__path__):
        try: importlib.import_module(f'flair_min.{info.name}')
        except Exception as e: failed.append(f"import flair_min.{info.name} failed: {type(e).__name__}: {e}")
    return failed


def run(command: list[str], cwd=None) -> tuple[str | None, str]:
    "(None if `command` exits 0, else a message with the end of its output; its output)."
    script = Path(sys.executable).parent / command[0]   # this environment's console script, as its PATH finds it
    done = subprocess.run([str(script), *command[1:]], cwd=cwd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode == 0: return None, output
    tail = '\n'.join(output.strip().splitlines()[-15:])
    return f"`{' '.join(command)}` exited {done.returncode}:\n{tail}", output


def check_commands() -> list[str]:
    "`flair-min --help`, `flair-min JOB --help` for every job, and a tiny demo, run as a user would."
    failure, usage = run(['flair-min', '--help'])
    jobs = re.search(r'\{([\w,-]+)\}', usage)   # argparse lists the subcommands as {a,b,...}
    failures = [failure] + [run(['flair-min', job, '--help'])[0] for job in (jobs.group(1).split(',') if jobs else [])]
    with tempfile.TemporaryDirectory() as tmp:
        failures.append(run(['flair-min', *TINY_DEMO, '--out', str(Path(tmp) / 'demo')], cwd=tmp)[0])
    return [f for f in failures if f]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('only', nargs='?', choices=['imports', 'install-command'],
                        help="run only the import check, or print the README's install command")
    args = parser.parse_args(argv)
    if args.only == 'install-command':
        print(install_command())
        return 0
    checks = [check_imports] if args.only else [check_modules, check_commands, check_imports]
    failures = [f for check in checks for f in check()]
    for f in failures: print('FAILED:', f)
    print(f"user install: {len(failures)} failure(s)" if failures else "user install: ok")
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
