"""Every integration guide's example runs as written (docs/integrations/*.md).

Each page holds one ``python`` block; it runs in an empty folder (models from configs,
no download). A block whose first line is ``# run: torchrun ...`` runs in new processes
under ``torch.distributed.run`` with the options it names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs" / "integrations").glob("*.md"))
TIMEOUT_S = 300


def _block(page: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"{page.name}: expected one python block, found {len(blocks)}"
    return blocks[0]


def test_every_integration_has_a_page_linked_from_the_readme():
    names = {p.name for p in PAGES}
    assert {"lightning.md", "transformers.md", "fsdp.md", "loggers.md", "sequences.md"} <= names
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert f"docs/integrations/{name}" in readme, f"README does not link {name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_guide_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_guide_example_runs(page, tmp_path, monkeypatch):
    code = _block(page)
    first = code.splitlines()[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    if not first.startswith("# run: torchrun"):
        # in this process (the frameworks are imported once for the suite), in an empty
        # folder, with the global RNGs and warning filters put back afterwards
        from ics_toolkit._state import RNGState

        monkeypatch.chdir(tmp_path)
        rng = RNGState.capture()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(code, str(page), "exec"), {"__name__": "__main__"})
        finally:
            rng.restore()
        return
    words = first.removeprefix("# run: torchrun").split()
    script = tmp_path / words[-1]
    script.write_text(code)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[:-1], str(script)]
    out = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0, (
        f"{page.name} example failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    )
