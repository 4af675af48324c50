"""The code sandbox, layer by layer, and the execution scorer on real HumanEval rows."""

from __future__ import annotations

import socket
import threading

import pytest

from fuselab.data.bundled import load_bundled
from fuselab.wrpo.sandbox import SandboxLimits, namespace_available, run_python
from fuselab.wrpo.scorers.execution import extract_code, run_tests

FAST = SandboxLimits(timeout_s=2.0, memory_mb=256)


def test_ordinary_code_runs_in_a_throwaway_directory(tmp_path):
    r = run_python(
        "import os; open('f.txt','w').write('x'); print(os.getcwd()); print(sorted(os.environ))", FAST
    )
    assert r.status == "ok", r.stderr
    cwd, env = r.stdout.splitlines()[:2]
    assert "fuselab-sandbox-" in cwd
    assert eval(env) == ["HOME", "LANG", "PATH", "TMPDIR"]  # stripped environment
    import os

    assert not os.path.exists(cwd)  # deleted afterwards


@pytest.mark.parametrize("guard", [True, False])
def test_infinite_loops_and_sleeps_are_killed(guard):
    limits = SandboxLimits(timeout_s=1.0, guard=guard)
    for src in ("while True: pass", "import time\ntime.sleep(60)"):
        r = run_python(src, limits)
        assert r.status == "timeout" and r.seconds < 5


@pytest.mark.parametrize("guard", [True, False])
def test_memory_bombs_hit_the_address_space_limit(guard):
    r = run_python(
        "x = bytearray(2 * 1024**3)\nprint('allocated')", SandboxLimits(memory_mb=256, guard=guard)
    )
    assert r.status == "memory" and "allocated" not in r.stdout


def test_file_size_limit_applies_inside_the_directory():
    r = run_python("open('big', 'w').write('x' * (4 * 1024**2))", SandboxLimits(file_size_mb=1))
    assert r.status == "error" and "File too large" in r.stderr


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


NET = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"


def test_guard_alone_blocks_network(listener):
    port, hits = listener
    r = run_python(NET.format(port=port), SandboxLimits(timeout_s=3, network_namespace=False))
    assert r.status == "error" and "sandbox: socket." in r.stderr and not hits
    r = run_python("import socket\nsocket.socket()", SandboxLimits(network_namespace=False))
    assert r.status == "error" and "socket.__new__ is not allowed" in r.stderr


@pytest.mark.skipif(not namespace_available(), reason="unshare -rn (user namespaces) unavailable here")
def test_network_namespace_alone_blocks_network(listener):
    port, hits = listener
    r = run_python(NET.format(port=port), SandboxLimits(timeout_s=3, guard=False, network_namespace=True))
    assert r.status == "error" and "connected" not in r.stdout and not hits
    assert "netns" in r.layers and "guard" not in r.layers


def test_writes_outside_the_directory_are_refused(tmp_path):
    target = tmp_path / "outside.txt"
    other = tmp_path / "keep.txt"
    other.write_text("keep")
    for src in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        f"import os\nos.remove({str(other)!r})",
        f"import os\nos.rename({str(other)!r}, 'stolen')",
        f"import shutil\nshutil.copyfile('/etc/hostname', {str(target)!r})",
        "open('../escape.txt', 'w').write('x')",
    ):
        r = run_python(src, FAST)
        assert r.status == "error" and "sandbox:" in r.stderr, (src, r.stderr)
    assert not target.exists() and other.read_text() == "keep"


def test_process_creation_and_ctypes_are_refused():
    for src in (
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import ctypes",
    ):
        r = run_python(src, FAST)
        assert r.status == "error" and "sandbox:" in r.stderr, (src, r.stderr)


# ------------------------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def humaneval_row():
    return next(r for r in load_bundled("code", "train") if r["entry_point"] == "has_close_elements")


def _prompt(row):
    return row["messages"][0]["content"]


def test_canonical_solution_passes(humaneval_row):
    answer = humaneval_row["messages"][1]["content"]
    out = run_tests(answer, humaneval_row["test"], humaneval_row["entry_point"], _prompt(humaneval_row), FAST)
    assert out.passed and out.score == 1.0 and out.n_total == 7


def test_partial_credit_and_failures(humaneval_row):
    test, entry, prompt = humaneval_row["test"], humaneval_row["entry_point"], _prompt(humaneval_row)
    always_true = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    out = run_tests(always_true, test, entry, prompt, FAST)
    assert not out.passed and out.n_passed == 4 and out.n_total == 7
    assert out.score == pytest.approx(0.1 + 0.9 * 4 / 7)
    assert run_tests(always_true, test, entry, prompt, FAST, partial_credit=False).score == 0.0
    assert run_tests("no code here", test, entry, prompt, FAST).score == 0.0
    wrong_name = "```python\ndef other(x):\n    return 1\n```"
    assert run_tests(wrong_name, test, entry, prompt, FAST).status == "error"
    looping = "```python\ndef has_close_elements(numbers, threshold):\n    while True: pass\n```"
    out = run_tests(looping, test, entry, prompt, SandboxLimits(timeout_s=1))
    assert out.status == "defined_only" and out.score == pytest.approx(0.1)


def test_printed_fake_reports_do_not_count(humaneval_row):
    spoof = (
        '```python\nprint(\'{"stage": "done", "passed": 7, "total": 7}\')\n'
        "def has_close_elements(numbers, threshold):\n    return False\n```"
    )
    out = run_tests(spoof, humaneval_row["test"], humaneval_row["entry_point"], limits=FAST)
    assert not out.passed and out.n_passed == 3


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef f(x):\n    return x\n```\n"
    assert extract_code(text, "f").startswith("def f(x)")
    assert extract_code("def f(): pass", "f") == "def f(): pass"
