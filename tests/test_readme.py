"""The README's examples run as written: its Python blocks in order (one namespace, like a notebook),
its ``>>>`` examples as doctests, and its ``tipr index`` / ``tipr search`` command lines.

They run in a scratch folder holding what the README says a user has: the pretrained
folder and checkpoint of a (tiny) trained model where ``tipr fit`` leaves them,
pedestrian crops, and a folder of photos. Training commands (``tipr fit``) are run by
tests/test_cli.py instead; ``tipr convert`` needs an IRRA/SEN file (tests/test_convert.py).
"""

from __future__ import annotations

import doctest
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUN_DIR = "outputs/synthetic/lightning_logs/version_0"


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def command_lines(prefixes: tuple[str, ...]) -> list[str]:
    """Shell lines of the README's bash blocks that start with one of ``prefixes`` (continuations joined)."""
    lines = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefixes):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as the README's reader has it, with a tiny trained model."""
    from tipr.methods.sen import SENModel
    from tipr.pretrained import save_pretrained
    from tipr.processing import TIPRProcessor

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = SENModel.from_backbone("tiny", num_classes=4, image_size=(32, 16), text_length=77)
    save_pretrained(model, TIPRProcessor.for_model(model), root / RUN_DIR / "pretrained")
    colours = [(200, 30, 30), (20, 30, 220), (30, 160, 40), (230, 230, 230), (20, 20, 20)]
    for folder in ("crops", "photos", "data/synthetic/imgs/test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours, start=1):
            Image.new("RGB", (24 + i, 60), colour).save(root / folder / f"{i:04d}.jpg")
    return root


def test_python_blocks_run_in_order(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    code = blocks("python")
    assert any("TIPRModel.from_pretrained" in body for body in code)  # the README shows the pretrained API
    namespace: dict = {}
    for number, body in enumerate(code, start=1):
        if body.lstrip().startswith(">>>"):
            continue  # doctests: below
        try:
            exec(compile(body, f"README.md python block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {number} failed: {type(e).__name__}: {e}\n{body}") from e
    # The notebook block ranked the two crops for one caption with the model it loaded.
    assert type(namespace["model"]).__name__ == "SENModel"
    assert namespace["scores"].shape == (1, 2) and namespace["ranking"].shape == (1, 2)


def test_doctest_blocks(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    examples = [body for body in blocks("python") if body.lstrip().startswith(">>>")]
    assert examples
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for number, body in enumerate(examples):
        runner.run(parser.get_doctest(body, {}, f"README doctest {number}", str(README), 0))
    assert runner.failures == 0 and runner.tries >= len(examples)


def test_index_and_search_command_lines(workspace, monkeypatch, capsys):
    from tipr.commands import main

    monkeypatch.chdir(workspace)
    lines = command_lines(("tipr index", "tipr search", "printf"))
    assert any(line.startswith("tipr index") for line in lines) and any(line.startswith("tipr search") for line in lines)
    # running the README's examples never overwrites a tracked file (docs/ holds the pictures the README shows)
    assert not [line for line in lines if "docs/" in line], "a README command writes into docs/"
    (workspace / "outputs").mkdir(exist_ok=True)
    for line in lines:
        if line.startswith("printf"):  # the queries file of the worked example
            text, target = re.match(r"printf '(.*)' > (\S+)$", line).groups()
            Path(target).write_text(text.encode().decode("unicode_escape"))
            continue
        assert main(shlex.split(line)[1:]) == 0, line
    printed = capsys.readouterr().out
    assert "query 1:" in printed
    assert (workspace / "outputs" / "search_example.png").is_file()  # the worked example's sheet


def test_the_serve_command_line_serves_the_gallery_the_readme_indexed(workspace, monkeypatch):
    """The README's 'tipr index' then 'tipr serve' (on any free port): the page and a text search answer."""
    import http.client
    import json
    import os
    import subprocess
    import sys

    from tipr.commands import main
    from tipr.pretrained import load_pretrained
    from tipr.search import GalleryIndex, search

    monkeypatch.chdir(workspace)
    for line in command_lines(("tipr index",)):
        assert main(shlex.split(line)[1:]) == 0, line
    (serve,) = command_lines(("tipr serve",))
    argv = shlex.split(serve)[2:] + ["--port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tipr.serve.command", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line + process.stderr.read()[-2000:]
        connection = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=60)
        connection.request("GET", "/")
        page = connection.getresponse()
        assert page.status == 200 and b"tipr search" in page.read()
        query = "a woman in a red coat"
        connection.request("POST", "/api/search/text", json.dumps({"queries": [query], "top_k": 3}),
                           {"content-type": "application/json"})
        answer = connection.getresponse()
        hits = json.loads(answer.read())["results"][0]["hits"]
        model, processor = load_pretrained(shlex.split(serve)[shlex.split(serve).index("--model") + 1])
        gallery = GalleryIndex.load(shlex.split(serve)[shlex.split(serve).index("--gallery") + 1])
        expected = search(model, processor, gallery, query, top_k=3)[0]
        assert answer.status == 200 and [h["path"] for h in hits] == [h.path for h in expected]
    finally:
        process.terminate()
        process.wait(10)


def test_the_install_says_how_to_take_the_cpu_build_of_torch():
    """On a machine without a GPU, PyPI's torch is the CUDA build (a 5.8 GB environment): the README installs
    torch and torchvision from PyTorch's CPU index first, then tipr, which keeps the torch it finds."""
    lines = [line.strip() for body in blocks("bash") for line in body.splitlines()]
    cpu = [i for i, line in enumerate(lines) if "download.pytorch.org/whl/cpu" in line]
    assert cpu, "no CPU install of torch in the README"
    first = cpu[0]
    assert lines[first].startswith("pip install torch torchvision ") and "--index-url" in lines[first]
    assert lines[first + 1] == "pip install -e ."
