"""Faults during a write: a full disk, a file-size limit, a read-only or forbidden folder, SIGINT, SIGKILL at random
points, another file system, two runs on one destination, leftovers of killed runs.

After each, the destination holds nothing or the complete result of one run (checked with ``verify``), no temporary
folder is left by a run that ended on its own, and the machine's refusals exit 3 with one line, not 1 or 2.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightsmith as ws
from weightsmith.checkpoint.staging import DestinationLock, LeftoverWarning, leftovers
from weightsmith.cli import main
from weightsmith.errors import EXIT_STORAGE, DestinationError

CLI = [sys.executable, "-m", "weightsmith.cli"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def staged(parent: Path, name: str = "out") -> list[Path]:
    """Everything weightsmith keeps beside ``parent/name`` while it works (temporary folders, the lock)."""
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.weightsmith-"))


def assert_nothing_left(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert staged(parent, name) == []


def assert_storage_refusal(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == EXIT_STORAGE == 3, err
    assert len(lines) == 1 and lines[0].startswith("weightsmith: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: a tmpfs of the given size mounted on a fresh folder (skips where mounting is not permitted)."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "mnt") -> Path:
        where = tmp_path / name
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory) -> Path:
    """A plain checkpoint of 256 tensors (64 MB, built at run time): writing it takes long enough, even on an idle
    machine, to be interrupted in the middle (8 MB was sometimes written and renamed before the signal landed)."""
    src = tmp_path_factory.mktemp("many") / "src"
    gen = torch.Generator().manual_seed(0)
    ws.save({f"layer.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(256)}, src)
    return src


# -- the machine refuses the write ----------------------------------------------------------------------------------


def test_disk_full_exits_3_and_leaves_nothing(capsys, tiny_model, tmpfs):
    small = tmpfs("64k")  # the tiny llama is ~1 MB
    code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", small / "out")
    assert_storage_refusal(code, err, "no space left", "free some space")
    assert list(small.iterdir()) == []


def test_disk_full_in_a_sharded_write(capsys, tiny_model, tmpfs):
    small = tmpfs("300k")  # some shards fit, then the disk fills
    code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", small / "out", "--shard-size", "64KB")
    assert_storage_refusal(code, err, "no space left")
    assert list(small.iterdir()) == []


def test_the_interpreter_ignores_sigxfsz():
    """Python starts with SIGXFSZ ignored, so a write past RLIMIT_FSIZE fails with EFBIG instead of killing us."""
    code = "import signal; print(signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_file_size_limit_exits_3_and_leaves_nothing(capsys, tiny_model, tmp_path):
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_storage_refusal(code, err, "file-size limit", "ulimit -f")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_each_storage_errno_in_the_io_thread(capsys, monkeypatch, tiny_model, tmp_path, code_):
    """A write refused in the I/O thread surfaces in the caller as one line and exit 3; the staging folder goes."""
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(code_, os.strerror(code_))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    src = tiny_model("llama")
    code, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out", "--dtype", "bfloat16")  # cast: pwrite path
    assert_storage_refusal(code, err)
    assert_nothing_left(tmp_path)


def test_read_only_parent_exits_3(capsys, tiny_model, tmpfs):
    ro = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", ro / "out")
    assert_storage_refusal(code, err, "not writable")
    assert list(ro.iterdir()) == []


def test_forbidden_parent_exits_3_for_an_ordinary_user(tiny_model):
    """As an unprivileged user (root ignores permissions), a folder without write permission is refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the command as another user")
    base = Path(tempfile.mkdtemp(prefix="ws-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        shutil.copytree(tiny_model("llama"), base / "src")
        for p in (base / "src", *(base / "src").iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (base / "locked").mkdir(mode=0o555)
        try:
            probe = subprocess.run([sys.executable, "-c", "import weightsmith"], user=65534, capture_output=True)
        except PermissionError:
            probe = None
        if probe is None or probe.returncode != 0:
            pytest.skip("this Python environment cannot be run by an unprivileged user")
        done = subprocess.run(
            [*CLI, "convert", str(base / "src"), "-o", str(base / "locked" / "out")],
            user=65534,
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": "/tmp"},
            timeout=120,
        )
        assert_storage_refusal(done.returncode, done.stderr, "not writable")
        assert list((base / "locked").iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- interrupted and killed runs ----------------------------------------------------------------------------------


def _start(argv: list[str]) -> subprocess.Popen:
    """The CLI in a child process with SIGINT at its default disposition: a test run started in the background of a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    return subprocess.Popen(
        [*CLI, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_staging(proc: subprocess.Popen, parent: Path, name: str = "out") -> bool:
    """Poll until the run has created its temporary folder (True), or has ended first (False)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(p for p, pid in leftovers(parent / name) if pid == proc.pid):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    raise AssertionError("the run never started writing")


def test_sigint_in_the_middle_leaves_nothing_and_exits_130(many_tensors, tmp_path):
    proc = _start(["convert", many_tensors, "-o", tmp_path / "out", "--shard-size", "1MB"])
    assert _wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGSTOP)  # hold it mid-write, so the interrupt lands there and not after the rename
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert_nothing_left(tmp_path)


def _consistent(out: Path) -> str:
    """'none' or 'complete' (verified against the manifest); anything else fails the test."""
    if not out.exists():
        return "none"
    ws.verify(out)  # raises on a partial or mixed result
    return "complete"


@settings(max_examples=4, deadline=None, derandomize=True)
@given(delay=st.floats(min_value=0.0, max_value=0.15))
def test_sigkill_at_random_points_of_convert(many_tensors, tmp_path_factory, delay):
    parent = tmp_path_factory.mktemp("kill")
    proc = _start(["convert", many_tensors, "-o", parent / "out", "--shard-size", "1MB"])
    started = _wait_for_staging(proc, parent)
    if started:
        time.sleep(delay)
    proc.kill()
    proc.wait()
    state = _consistent(parent / "out")
    # The next run to the same destination succeeds and removes what the killed one left behind.
    ws.convert(many_tensors, parent / "out", shard_size="1MB", force=state == "complete")
    assert _consistent(parent / "out") == "complete"
    assert staged(parent) == []


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4
    )
    out = tmp_path_factory.mktemp("q") / "llama8"
    tf.LlamaForCausalLM(config).save_pretrained(out)
    return out


@settings(max_examples=2, deadline=None, derandomize=True)
@given(delay=st.floats(min_value=0.0, max_value=0.3))
def test_sigkill_at_random_points_of_quantize(quantizable, tmp_path_factory, delay):
    parent = tmp_path_factory.mktemp("killq")
    proc = _start(["quantize", quantizable, "-o", parent / "out", "--scheme", "int8", "--shard-size", "1MB"])
    if _wait_for_staging(proc, parent):
        time.sleep(delay)
    proc.kill()
    proc.wait()
    state = _consistent(parent / "out")
    ws.quantize(quantizable, parent / "out", "int8", shard_size="1MB", force=state == "complete")
    assert _consistent(parent / "out") == "complete"
    assert staged(parent) == []


# -- where the temporary folder lives, and who else writes --------------------------------------------------------


def test_staging_folder_is_a_sibling_on_the_destinations_file_system(monkeypatch, tiny_model, tmpfs, tmp_path):
    """The destination on another file system than TMPDIR: the temporary folder is beside the destination, so the
    final rename stays on one file system (atomic)."""
    dest_fs = tmpfs("16m")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    renames: list[tuple[Path, Path]] = []
    real = Path.rename

    def recording(self, target):
        renames.append((Path(self), Path(target)))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", recording)
    try:
        ws.convert(tiny_model("llama"), dest_fs / "out")
    finally:
        tempfile.tempdir = None
    assert os.stat(dest_fs).st_dev != os.stat(tmp_path).st_dev
    final = [(a, b) for a, b in renames if b == dest_fs / "out"]
    assert len(final) == 1 and final[0][0].parent == dest_fs and final[0][0].name.startswith(".out.weightsmith-")
    ws.verify(dest_fs / "out")
    assert staged(dest_fs) == []


def test_a_second_writer_is_refused_with_one_line(capsys, tiny_model, tmp_path):
    lock = DestinationLock(tmp_path / "out").acquire()  # what a running weightsmith holds
    try:
        code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", tmp_path / "out")
    finally:
        lock.release()
    assert code == 2 and err.count("\n") == 1
    assert f"another weightsmith run (pid {os.getpid()}) is writing this output" in err
    assert_nothing_left(tmp_path)


def test_two_runs_at_once_leave_one_complete_result(many_tensors, tmp_path):
    procs = [_start(["convert", many_tensors, "-o", tmp_path / "out", "--shard-size", "1MB"]) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 2], [0, 0]), results  # [0, 0]: one finished before the other began (then it is refused)
    for code, err in results:
        if code == 2:
            assert err.count("\n") == 1 and ("another weightsmith run" in err or "already exists" in err), err
    assert _consistent(tmp_path / "out") == "complete"
    assert staged(tmp_path) == []


def test_two_forced_runs_at_once_leave_one_complete_result(many_tensors, tmp_path):
    ws.convert(many_tensors, tmp_path / "out", shard_size="2MB")
    argv = ["convert", many_tensors, "-o", tmp_path / "out", "--shard-size", "1MB", "--force"]
    procs = [_start(argv) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert 0 in [code for code, _ in results], results
    assert all(code in (0, 2) for code, _ in results), results
    assert _consistent(tmp_path / "out") == "complete"
    ws.convert(many_tensors, tmp_path / "expected", shard_size="1MB")
    expected = sorted(p.name for p in (tmp_path / "expected").glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == expected  # a new run's, not the old
    assert staged(tmp_path) == []


def test_a_destination_that_appears_during_the_run_is_never_mixed(monkeypatch, tiny_model, tmp_path):
    """Someone else fills the destination between our last check and the rename: the rename fails, their files stay,
    ours go."""
    import weightsmith.checkpoint.writer as writer_module

    real = writer_module.check_destination
    state = {"calls": 0}

    def racing(out, force):
        real(out, force)
        state["calls"] += 1
        if state["calls"] == 2:  # the check right before the rename
            out.mkdir()
            (out / "theirs.txt").write_text("x")

    monkeypatch.setattr(writer_module, "check_destination", racing)
    with pytest.raises(DestinationError, match="something else wrote this output"):
        ws.convert(tiny_model("llama"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["theirs.txt"]
    assert staged(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_and_others_reported(tiny_model, tmp_path):
    dead = tmp_path / f".out.weightsmith-{_dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / ".shard-0.partial").write_bytes(b"x" * 100)
    dead_old = tmp_path / f".out.weightsmith-old-{_dead_pid()}-0123abce"
    dead_old.mkdir()
    alive = tmp_path / f".out.weightsmith-{os.getppid()}-0123abcf"  # a process that still runs
    alive.mkdir()
    legacy = tmp_path / ".out.weightsmith-89abcdef"  # no pid recorded
    legacy.mkdir()
    other = tmp_path / ".other.weightsmith-1-0123abcd"  # another destination's: not ours to judge
    other.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ws.convert(tiny_model("llama"), tmp_path / "out")
    assert not dead.exists() and not dead_old.exists()
    assert alive.exists() and legacy.exists() and other.exists()
    reported = sorted(str(w.message).split(":")[0] for w in caught if issubclass(w.category, LeftoverWarning))
    assert reported == sorted([str(alive), str(legacy)])
    ws.verify(tmp_path / "out")


def test_leftover_warning_is_one_plain_line_in_the_cli(capsys, tiny_model, tmp_path):
    (tmp_path / ".out.weightsmith-89abcdef").mkdir()
    code, err = run_cli(capsys, "convert", tiny_model("llama"), "-o", tmp_path / "out")
    assert code == 0
    assert err.strip().splitlines()[-1].startswith("weightsmith: warning: ")
    assert "left by another weightsmith run (no owner recorded); not removed" in err


def test_an_input_rewritten_while_it_is_read_is_refused(monkeypatch, tmp_path):
    """Another process rewrites the input in the middle of a run: the run stops with one line, nothing is left."""
    import weightsmith.checkpoint.writer as writer_module

    src = tmp_path / "src"
    ws.save({f"t{i}": torch.full((64,), float(i)) for i in range(4)}, src)
    shard = src / "model.safetensors"
    real = writer_module._Shard.copy
    calls = {"n": 0}

    def copy_then_rewrite(self, name, info, location, check):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first tensor: the file is replaced by a same-sized one
            data = shard.read_bytes()
            time.sleep(0.01)
            shard.write_bytes(data[:-4] + b"\0\0\0\0")
        return real(self, name, info, location, check)

    monkeypatch.setattr(writer_module._Shard, "copy", copy_then_rewrite)
    with pytest.raises(ws.WeightsmithError, match=r"model.safetensors: changed while being read \(at tensor 't1'\)"):
        ws.convert(src, tmp_path / "out")
    assert_nothing_left(tmp_path)
    ckpt = ws.open(src)
    shard.write_bytes(shard.read_bytes())  # rewritten after opening: reading a tensor is refused too
    with pytest.raises(ws.WeightsmithError, match="changed while being read"):
        ckpt["t0"]
