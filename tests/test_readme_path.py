"""The README's path, run as written from a fresh copy of the repository: the set-up command's demo
training, then the next commands in the README's order (evaluate, plot, serve one request).

The commands are read from README.md, so the README and this test cannot drift apart; the test only
appends flags that make each one short (2 training steps on depth-1 towers, 1 episode of 3 steps)."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.slow

SHORTER = {
    "train.py": ["--num-train-steps", "2", "--log-interval", "1", "--xla-fast-compile",
                 *(x for m in ("paligemma", "action-expert", "siglip") for x in (f"--model.{m}.depth", "1"))],
    "evaluate.py": ["--n", "1", "--max-steps", "3"],
}


def readme_path() -> list[str]:
    """The commands from the set-up section to "A real run", in order: the demo's training (the
    set-up line after its `pip install`), then the next steps; the test-suite line is not part of it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Set up on a fresh machine"): text.index("### A real run")]
    commands = []
    for line in re.findall(r"^ {4}(\S.*)$", section, re.M):
        for part in line.split("#")[0].split("&&"):
            part = part.strip()
            if part and not part.startswith("pip install") and "pytest" not in part:
                commands.append(part)
    return commands


def program(command: str) -> str:
    words = [w for w in shlex.split(command) if "=" not in w or w.startswith("-")]
    return words[2] if words[1] == "-m" else words[1]


def fresh_copy(dest: pathlib.Path) -> pathlib.Path:
    """The files a clone has (tracked, and untracked but not ignored: a change not yet committed is
    tested too); no outputs/, no caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no way to tell a clone's files from build outputs")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def split_env(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, [sys.executable if w == "python" else w for w in words]


def test_the_readme_path_from_a_fresh_clone_train_evaluate_plot_serve(tmp_path):
    commands = readme_path()
    assert [program(c) for c in commands] == ["train.py", "evaluate.py", "eqx_pi05.plot", "eqx_pi05.serve"], commands
    clone = fresh_copy(tmp_path / "clone")
    base_env = {**os.environ, "PYTHONPATH": str(clone), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # demo dataset built afresh
    run_dir = clone / "outputs" / "curric_selfdistill_demo"  # where the README says the demo run goes

    for command in commands[:3]:
        extra_env, argv = split_env(command)
        done = subprocess.run([*argv, *SHORTER.get(program(command), [])], cwd=clone, env={**base_env, **extra_env},
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        if program(command) == "train.py":
            assert (run_dir / "checkpoints" / "2" / "params").is_dir() and (run_dir / "metrics.jsonl").is_file()
            assert "compiling the training step" in done.stderr  # the phase is named, not a bar frozen at 0 %
            assert " INFO " not in done.stderr  # no absl/orbax INFO without --verbose
        elif program(command) == "evaluate.py":
            results = clone / "outputs" / "eval" / "curric_selfdistill_demo_libero_spatial" / "results.md"
            assert results.is_file() and "audit=pass" in done.stderr
    assert (clone / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from test_serve import _wait_healthy, connect, request

    extra_env, argv = split_env(commands[3])
    port = free_port()
    argv = [*argv[: argv.index("--port")], *argv[argv.index("--port") + 2:]] if "--port" in argv else argv
    server = subprocess.Popen([*argv, "--port", str(port)], cwd=clone, env={**base_env, **extra_env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(port, server)
        with connect(port) as client:
            assert client.metadata["variant"] == "curric_selfdistill"
            assert client.metadata["camera_removal"] == "eval physical view-removal {agentview=1} audit=pass"
            actions = client.infer(request(noise_seed=0))["actions"]
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert actions.shape == (10, 7) and np.isfinite(actions).all() and np.abs(actions).max() > 0
