"""The localization explorer (14_localization) in a real browser: JupyterLab in a subprocess, headless Chromium driven
by selenium. A small notebook trains the tiny FLAIR on the toy world for a few seconds and shows `Explorer.widget()`;
the test runs all its cells from JupyterLab's Run menu, checks that the widgets and the overlay appear (the head
dropdown showing "mean of heads"), types a sentence and reads the redrawn overlay's title back out of the PNG in the
page (`Explorer.png` writes the title into the PNG's 'Title' text chunk), then picks another map kind the same way.

One screenshot: to results/explorer_jupyterlab.png (with a note, results/explorer_jupyterlab.md) when
FLAIR_MIN_WRITE_RESULTS=1, else to pytest's tmp_path. Needs `apt-get install chromium chromium-driver` and
`pip install selenium`; a missing or hanging piece fails the test with what could not start, it never skips. The
timeouts only catch hangs: every wait polls for progress and returns as soon as the page shows what it waits for."""
import base64, io, json, os, platform, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT

START_TIMEOUT = 180        # s: JupyterLab's server, Chromium, the JupyterLab page
RUN_TIMEOUT = 300          # s: all cells, the toy training included
REDRAW_TIMEOUT = 120       # s: one redraw after a widget changed
TOKEN = 'flair-min-browser-test'
TYPED = 'A large yellow diamond at the top'       # an object of the first image (the title keeps 40 characters)
SCREENSHOT_MAX_BYTES = 250_000

NOTEBOOK_CELLS = [
    # a toy FLAIR trained for a few seconds on the toy world, as `flair-min demo --quick` does it, only shorter
    """\
import time
from IPython.display import display
from flair_min.demo import DemoConfig, make_demo_loader, prepare_toy_data, train_demo_model, training_world
from flair_min.localization import Explorer
from flair_min.toyworld import make_scene

tic = time.perf_counter()
config = DemoConfig.quick(out='run', train_scenes=128, eval_scenes=4, steps=60, batch_size=16, warmup=5,
                          progress=False, plots=False)
shards, _ = prepare_toy_data(config)
model, history = train_demo_model('flair', make_demo_loader(shards, config), config)
loss = history['loss']
print(f"TRAINED {config.steps} steps in {time.perf_counter() - tic:.1f} s, loss {loss[0]:.3f} -> {loss[-1]:.3f}")""",
    # held-out scenes of the same world
    """\
scenes = [make_scene(config.train_scenes + i, training_world(config)) for i in range(3)]
explorer = Explorer(model, [s.image for s in scenes], text=scenes[0].sentences[2])
display(explorer.widget())""",
    "print('ALL CELLS DONE')",
]


def test_explorer_in_jupyterlab(tmp_path):
    webdriver, By, Keys, Select, WebDriverException = _selenium()
    chromium, chromedriver = _browser_binaries()
    root = tmp_path / 'lab'; root.mkdir()
    (root / 'explorer.ipynb').write_text(json.dumps(_notebook(NOTEBOOK_CELLS), indent=1))
    clock, tic = {}, time.perf_counter()
    with _jupyterlab(root, tmp_path) as port:
        clock['server_s'] = time.perf_counter() - tic
        with _chromium(webdriver, chromium, chromedriver, tmp_path, WebDriverException) as driver:
            page = Page(driver, tmp_path)
            tic = time.perf_counter()
            driver.get(f'http://127.0.0.1:{port}/lab/tree/explorer.ipynb?token={TOKEN}')
            page.wait('the notebook open in JupyterLab, its kernel idle (the status bar: "| Idle")', START_TIMEOUT,
                      lambda: page.css('.jp-NotebookPanel .jp-Cell') and page.xpath(
                          "//*[contains(@class, 'jp-StatusBar')]//span[contains(., '| Idle')]"
                          "[not(contains(., 'No Kernel'))]"))
            page.xpath("//li[contains(@class, 'lm-MenuBar-item')][normalize-space()='Run']").click()
            page.wait('the Run menu\'s "Run All Cells"', REDRAW_TIMEOUT,
                      lambda: page.xpath("//li[contains(@class, 'lm-Menu-item')]"
                                         "[./div[contains(@class, 'lm-Menu-itemLabel')][.='Run All Cells']]")).click()
            clock['page_s'], tic = time.perf_counter() - tic, time.perf_counter()
            page.wait('the notebook to run to its end (the toy training included)', RUN_TIMEOUT,
                      lambda: 'ALL CELLS DONE' in page.outputs() and not page.busy_prompts())
            clock['run_all_s'] = time.perf_counter() - tic
            trained = re.search(r'TRAINED (\d+) steps in ([\d.]+) s, loss ([\d.]+) -> ([\d.]+)', page.outputs())
            assert trained, f'no training line in the outputs:\n{page.outputs()}'
            assert float(trained[4]) < float(trained[3]), f'the toy training did not lower the loss: {trained[0]}'

            # the widgets, the head dropdown showing its first option, and the overlay
            slider = page.wait('the image slider', REDRAW_TIMEOUT, lambda: page.labelled('widget-slider', 'image'))
            text = page.labelled('widget-text', 'sentence').find_element(By.TAG_NAME, 'input')
            kind = Select(page.labelled('widget-dropdown', 'map').find_element(By.TAG_NAME, 'select'))
            head = page.labelled('widget-dropdown', 'head').find_element(By.TAG_NAME, 'select')
            assert slider.is_displayed() and text.is_displayed() and head.is_displayed()
            shown = driver.execute_script('const s = arguments[0]; return s.selectedIndex < 0 ? null : '
                                          's.options[s.selectedIndex].text', head)
            shown = shown and shown.replace('\xa0', ' ')                    # ipywidgets writes spaces as &nbsp;
            assert shown == 'mean of heads', f'the head dropdown shows {shown!r}, not "mean of heads"'
            assert kind.first_selected_option.text == 'attention'
            first = page.wait('the overlay image', REDRAW_TIMEOUT, page.overlay_title)
            assert first.split('\n')[0] == text.get_attribute('value')[:40] and first.split('\n')[1].startswith(
                'attention'), f'the first overlay is titled {first!r}'

            # type a sentence: the overlay is redrawn with it in its title
            tic = time.perf_counter()
            text.click(); text.send_keys(Keys.CONTROL, 'a'); text.send_keys(TYPED, Keys.ENTER)
            assert text.get_attribute('value') == TYPED, f"the sentence box holds {text.get_attribute('value')!r}"
            page.wait(f'the overlay redrawn with {TYPED!r} in its title (it was {first!r})', REDRAW_TIMEOUT,
                      lambda: (page.overlay_title() or '').split('\n')[0] == TYPED)
            assert page.overlay_title().split('\n')[1].startswith('attention'), page.overlay_title()
            clock['typed_redraw_s'] = time.perf_counter() - tic

            # pick another map kind: redrawn again, the sentence kept
            kind.select_by_visible_text('patch_cosine')
            page.wait('the overlay redrawn for the map kind patch_cosine', REDRAW_TIMEOUT,
                      lambda: page.overlay_title() == f'{TYPED}\npatch_cosine')
            driver.execute_script('document.querySelector(".widget-output img").scrollIntoView({block: "end"})')
            time.sleep(0.5)                                                       # let the scroll settle
            shot = _save_screenshot(driver, tmp_path)
    clock = {k: round(v, 1) for k, v in clock.items()}
    print(f'explorer in JupyterLab: {clock}; model: {trained[0]}; screenshot {shot}')
    if os.environ.get('FLAIR_MIN_WRITE_RESULTS') == '1': _write_results(clock, trained[0])


class Page:
    "What the test reads off JupyterLab's page; `wait` polls until a check gives something, or fails naming it."
    def __init__(self, driver, tmp_path): self.driver, self.tmp_path = driver, tmp_path

    def css(self, selector):
        found = self.driver.find_elements('css selector', selector)
        return found[0] if found else None

    def xpath(self, path):
        found = self.driver.find_elements('xpath', path)
        return found[0] if found else None

    def labelled(self, widget_class: str, label: str):
        "The ipywidgets control of class `widget_class` whose description label reads `label`."
        return self.xpath(f"//div[contains(@class, '{widget_class}')][./label[normalize-space()='{label}']]")

    # read in one script each, so that an output redrawn meanwhile cannot leave a stale element in the hand
    def outputs(self) -> str:
        "The text of all output areas."
        return self.driver.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                                          ".map(e => e.innerText).join('\\n')")

    def busy_prompts(self) -> int:
        "How many input prompts read '[*]:', cells still queued or running."
        return self.driver.execute_script("return Array.from(document.querySelectorAll('.jp-InputPrompt'))"
                                          ".filter(e => e.innerText.includes('*')).length")

    def overlay_title(self):
        "The 'Title' text chunk of the PNG in the explorer's output area, as the browser holds it; None if none."
        src = self.driver.execute_script("const img = document.querySelector('.widget-output img');"
                                         "return img ? img.getAttribute('src') : null")
        if not src or not src.startswith('data:image/png;base64,'): return None
        return Image.open(io.BytesIO(base64.b64decode(src.split(',', 1)[1]))).text.get('Title')

    def wait(self, what: str, timeout: float, check):
        "Poll `check` until it returns something truthy; fail (a traceback in the page fails at once)."
        from selenium.common.exceptions import StaleElementReferenceException
        deadline = time.monotonic() + timeout
        while True:
            try:
                if found := check(): return found
            except StaleElementReferenceException: pass                        # redrawn while read: poll again
            if 'Traceback' in (outputs := self.outputs()):
                self.fail(f'a cell failed while waiting for {what}:\n{outputs[-3000:]}')
            if time.monotonic() > deadline: self.fail(f'waited {timeout} s for {what}, in vain')
            time.sleep(0.25)

    def fail(self, message: str):
        shot = self.tmp_path / 'failure.png'
        try: self.driver.save_screenshot(str(shot)); message += f'\n(screenshot of the page: {shot})'
        except Exception: pass
        pytest.fail(message, pytrace=False)


def _selenium():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import Select
    except ImportError as e:
        pytest.fail(f'selenium could not be imported ({e}): pip install selenium', pytrace=False)
    return webdriver, By, Keys, Select, WebDriverException


def _browser_binaries() -> tuple[str, str]:
    "Debian's chromium and chromedriver, or (on GitHub's runners) Google Chrome and the driver its image provides."
    chromium = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    driver_dir = os.environ.get('CHROMEWEBDRIVER')             # set by GitHub's Ubuntu images
    chromedriver = shutil.which('chromedriver') or (driver_dir and shutil.which('chromedriver', path=driver_dir))
    if not chromium: pytest.fail('chromium not found: apt-get install chromium chromium-driver', pytrace=False)
    if not chromedriver: pytest.fail('chromedriver not found: apt-get install chromium-driver', pytrace=False)
    return chromium, chromedriver


def _notebook(cells) -> dict:
    return {'nbformat': 4, 'nbformat_minor': 5,
            'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
            'cells': [{'cell_type': 'code', 'id': f'cell{i}', 'metadata': {}, 'execution_count': None,
                       'outputs': [], 'source': source} for i, source in enumerate(cells)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class _jupyterlab:
    "JupyterLab's server on 127.0.0.1 in a process group of its own; on exit it is stopped, and its kernels with it."
    def __init__(self, root: Path, tmp_path: Path): self.root, self.tmp = root, tmp_path

    def __enter__(self) -> int:
        self.port, home = _free_port(), self.tmp / 'jupyter'
        env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}      # the kernel draws as a reader's does
        env.update(JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_DATA_DIR=str(home / 'data'),
                   JUPYTER_RUNTIME_DIR=str(home / 'runtime'), JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'),
                   JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'), IPYTHONDIR=str(home / 'ipython'),
                   PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]),
                   OMP_NUM_THREADS='1')   # the kernel's torch on one thread: the browser and the server share the cores
        command = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ip=127.0.0.1',
                   f'--port={self.port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={TOKEN}',
                   f'--ServerApp.root_dir={self.root}', '--LabApp.news_url=None',
                   '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
        notification = home / 'settings' / '@jupyterlab' / 'apputils-extension' / 'notification.jupyterlab-settings'
        notification.parent.mkdir(parents=True)                               # no "news?" question, no update check
        notification.write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
        self.log = self.tmp / 'jupyterlab.log'
        try:
            self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self.log.open('w'), stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e: pytest.fail(f'JupyterLab could not start ({e}): {" ".join(command)}', pytrace=False)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # 127.0.0.1, never through a proxy
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None: self._fail(f'it exited with code {self.proc.returncode}')
            try:
                with opener.open(f'http://127.0.0.1:{self.port}/api/status?token={TOKEN}', timeout=5) as r:
                    if r.status == 200: return self.port
            except OSError: pass
            if time.monotonic() > deadline: self._fail(f'it did not answer within {START_TIMEOUT} s')
            time.sleep(0.25)

    def __exit__(self, *exc):
        kernels = _descendants(self.proc.pid)             # jupyter_client starts each kernel in a session of its own
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)       # the server shuts its kernels down, then exits
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        for pid, started in kernels:                       # any it left behind: the same id *and* start time
            if _process_start(pid) == started:
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass

    def _fail(self, why: str):
        self.__exit__()
        pytest.fail(f'JupyterLab could not start: {why}; the end of its log ({self.log}):\n'
                    f'{self.log.read_text()[-3000:]}', pytrace=False)


def _process_start(pid: int):
    "(parent id, start time) of a process from /proc/<pid>/stat; None if it is gone (or there is no /proc)."
    try: fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError: return None
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, tuple]]:
    "(id, _process_start) of every process below `pid`, read from /proc (empty where there is none)."
    below = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        child = int(stat.parent.name)
        if started := _process_start(child): below.setdefault(started[0], []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in below.get(todo.pop(), []):
            if started := _process_start(child): out.append((child, started)); todo.append(child)
    return out


class _chromium:
    "Headless Chromium through chromedriver, with flags that keep it off the (closed) network; quit on exit."
    def __init__(self, webdriver, chromium, chromedriver, tmp_path, WebDriverException):
        self.args = webdriver, chromium, chromedriver, tmp_path, WebDriverException

    def __enter__(self):
        webdriver, chromium, chromedriver, tmp_path, WebDriverException = self.args
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                     '--disable-background-networking', '--disable-component-update', '--disable-sync',
                     '--disable-dev-shm-usage', '--no-proxy-server', '--window-size=1100,960',
                     f'--user-data-dir={tmp_path / "chromium-profile"}'):
            options.add_argument(flag)
        service = webdriver.ChromeService(executable_path=chromedriver, log_output=str(tmp_path / 'chromedriver.log'))
        try: self.driver = webdriver.Chrome(options=options, service=service)
        except WebDriverException as e:
            pytest.fail(f'Chromium could not start through {chromedriver} ({chromium}): {e.msg}', pytrace=False)
        self.driver.set_page_load_timeout(START_TIMEOUT)
        return self.driver

    def __exit__(self, *exc): self.driver.quit()


def _save_screenshot(driver, tmp_path) -> Path:
    "The window as a palette PNG (small, and the same pixels give the same bytes), to results/ or tmp_path."
    write = os.environ.get('FLAIR_MIN_WRITE_RESULTS') == '1'
    path = ROOT / 'results' / 'explorer_jupyterlab.png' if write else tmp_path / 'explorer_jupyterlab.png'
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert('RGB')
    image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    assert path.stat().st_size < SCREENSHOT_MAX_BYTES, f'{path}: {path.stat().st_size} bytes'
    return path


def _write_results(clock: dict, trained: str):
    import ipywidgets, jupyterlab, selenium, torch
    run = lambda *c: subprocess.run(c, capture_output=True, text=True).stdout.strip()    # noqa: E731
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else ''
    versions = (f"{run(shutil.which('chromium'), '--version')}, JupyterLab {jupyterlab.__version__}, "
                f"ipywidgets {ipywidgets.__version__}, selenium {selenium.__version__}, torch {torch.__version__}")
    (ROOT / 'results' / 'explorer_jupyterlab.md').write_text(f"""\
### The localization explorer in JupyterLab, in a headless browser

![the explorer in JupyterLab](explorer_jupyterlab.png)

`tests/test_browser.py` writes a three-cell notebook, opens it in JupyterLab in headless Chromium (selenium) and
runs all cells from the Run menu. The first cell trains the tiny toy-world FLAIR of `17_demo` for a few seconds:
{trained}.
The second shows `Explorer(model, images).widget()` (`14_localization` §5) over three held-out toy scenes.

The screenshot is taken after the test typed the sentence "{TYPED}" into the sentence box and
picked the map kind patch_cosine: the overlay is the redrawn map, titled with that sentence and kind (the test reads
the title out of the PNG in the page), and the head dropdown shows "mean of heads".

- Command: `FLAIR_MIN_WRITE_RESULTS=1 python -m pytest tests/test_browser.py` (without the variable, the screenshot
  goes to pytest's tmp_path and nothing is written here).
- Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), {platform.system()}.
- Software: {versions}.
- Date: {run('date')}.
- Phases (s): server start {clock['server_s']}, page until Run All {clock['page_s']}, all cells
  {clock['run_all_s']}, typed sentence to its redrawn overlay {clock['typed_redraw_s']}.
""")
