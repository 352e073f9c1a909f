"""The two files every benchmark here writes, and the line that says how a run was made.

`OUT.json` holds the figures with how they were made (command, machine, torch, threads, date); `OUT.md` is the note
a notebook shows: a `###` title, that same line, then the tables and a sentence or two.
"""
import json, os, platform, sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def run_facts(script: str, argv=None, threads: int | None = None) -> dict:
    "How a run was made: the command line of `benchmarks/<script>`, the machine, torch, its threads, the date (UTC)."
    argv = sys.argv[1:] if argv is None else list(argv)
    return dict(command=' '.join([f'python benchmarks/{script}', *argv]),
                machine=f'{platform.machine()}, {os.cpu_count()} cores', torch=torch.__version__,
                threads=torch.get_num_threads() if threads is None else threads,
                date=f'{datetime.now(timezone.utc):%Y-%m-%d}')


def write_results(out, result: dict, title: str, body: str) -> str:
    "Write OUT.json (`result`) and OUT.md (title, the run's line, `body`); print the note and return it."
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=1) + '\n')
    note = (f"### {title}\n\nCommand: `{result['command']}`. Machine: {result['machine']}, torch {result['torch']}, "
            f"threads: {result['threads']}. Date: {result['date']}.\n\n{body.strip()}\n")
    out.with_suffix('.md').write_text(note)
    print(note)
    return note
