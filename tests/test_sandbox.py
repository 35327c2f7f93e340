"""The code reward's sandbox: hostile completions score 0 and harm nothing; hung programs are killed in time."""

import hashlib
import os
import socket
import time

import pytest

from dsv3.train.rewards import code_reward
from dsv3.train.sandbox import isolation_level, run_python

ISOLATED = isolation_level() == "namespaces"
needs_namespaces = pytest.mark.skipif(
    not ISOLATED,
    reason="namespaces unavailable (needs Linux and root); the rlimits fallback does not block reads or network",
)


def _tree_hash(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        h.update(dirpath.encode())
        for name in sorted(filenames):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_code_reward_scores_correct_and_wrong_code():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    crash = "def add(a, b): raise SystemExit(3)"
    assert code_reward(["p"] * 4, [good, wrong, crash, good], tests=[tests, tests, tests, None]) == [
        1.0,
        0.0,
        0.0,
        None,
    ]


@needs_namespaces
@pytest.mark.timeout(60)
def test_hostile_code_scores_zero_and_harms_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    ckpt = run / "checkpoints" / "step_10" / "model.safetensors"
    ckpt.write_text("SECRET-WEIGHTS")
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    before = _tree_hash(run)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    attacks = {
        "delete the run": (
            f"import shutil\ndef attack():\n    shutil.rmtree({str(run)!r})\n    return True",
            f"import os\nassert attack() and not os.path.exists({str(run)!r})",
        ),
        "read a checkpoint": (
            f"def attack():\n    return open({str(ckpt)!r}).read()",
            "assert attack() == 'SECRET-WEIGHTS'",
        ),
        "overwrite metrics": (
            f"def attack():\n    open({str(run / 'metrics.jsonl')!r}, 'w').write('x')\n    return True",
            "assert attack()",
        ),
        "open a socket": (
            f"import socket\ndef attack():\n    s = socket.create_connection(('127.0.0.1', {port}), "
            f"timeout=3)\n    s.sendall(b'leak')\n    return True",
            "assert attack()",
        ),
        "write to /tmp": (
            "def attack():\n    open('/tmp/dsv3-pwned', 'w').write('x')\n    return True",
            "assert attack()",
        ),
    }
    scores = code_reward(["p"] * len(attacks), [a for a, _ in attacks.values()], tests=[t for _, t in attacks.values()])
    assert dict(zip(attacks, scores)) == dict.fromkeys(attacks, 0.0)
    assert _tree_hash(run) == before
    assert not os.path.exists("/tmp/dsv3-pwned")
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection reached the listener
        server.accept()
    server.close()


@pytest.mark.timeout(60)
def test_infinite_loop_is_killed_in_bounded_time():
    start = time.monotonic()
    scores = code_reward(
        ["p", "p"],
        ["while True:\n    pass", "def f():\n    return 1"],
        tests=["assert True", "assert f() == 1"],
        time_limit=1.0,
    )
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0]
    assert elapsed < 10, elapsed
    hung = run_python("import time\ntime.sleep(60)", time_limit=1.0)
    assert hung.timed_out and not hung.ok and hung.returncode is None


@needs_namespaces
def test_sandbox_sees_only_its_box():
    probe = run_python("import os\nprint(os.getuid(), sorted(os.listdir('/')))\nopen('out', 'w').write('ok')")
    assert probe.ok, probe.stderr
    uid, listing = probe.stdout.split(" ", 1)
    assert int(uid) >= 100000
    assert set(eval(listing)) <= {"bin", "box", "dev", "etc", "lib", "lib64", "root", "usr"}  # no /work, /tmp
    memory = run_python("x = bytearray(1 << 31)", memory_mb=256)
    assert not memory.ok and "MemoryError" in memory.stderr
    fill = run_python(
        "written = 0\ntry:\n    for i in range(20):\n"
        "        open(f'f{i}', 'wb').write(b'x' * (15 << 20))\n"
        "        written += 15\nexcept OSError as e:\n    print(written, e.errno)\n"
    )
    assert fill.ok and fill.stdout.split() == ["60", "28"], fill  # ENOSPC: the box is a 64 MiB tmpfs
    forks = run_python(
        "import os, time\nn = 0\ntry:\n    for i in range(40):\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n            os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print(n, e.errno, os.getuid())\n",
        time_limit=2.0,
    )
    n, errno, uid = forks.stdout.split()
    assert forks.ok and (n, errno) == ("15", "11"), forks  # EAGAIN at 16 processes
    assert not _processes_of(int(uid))  # the sleeping children died with PID 1 of their namespace


def _processes_of(uid):
    """Processes of ``uid`` still alive on this machine."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                alive.append(pid)
        except FileNotFoundError:
            pass
    return alive
