"""What users meet when things go wrong around a run: edited data, killed and concurrent
processes, colleagues' umasks, hand-edited or damaged files, full or read-only disks.

Every bad case ends in one line ``dlm: error: …`` (a DlmError), never a traceback and
never a half-written file. Concurrency is tested with real processes; only a full disk
is simulated (by a write that raises ENOSPC) where a real small file system cannot be
mounted.
"""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import dlm.checkpoint as ckpt_mod
from dlm.checkpoint import create_run_dir, has_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from dlm.config import DataConfig, RunConfig
from dlm.data import TOKENIZERS, load_tokenizer, prepare_data
from dlm.data.cache import cache_root
from dlm.data.corpora import check_data_identity, content_hash, data_identity, load_corpus
from dlm.errors import DlmError
from dlm.fsio import HOST, atomic_write_text
from dlm.metrics import read_metrics_lines, trim_metrics
from dlm.runlock import run_lock
from helpers import TINY, one_line_error, run

TEXT = "".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    from dlm.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY]) == 0
    return out


def _train_argv(corpus, out, steps=2):
    return ["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", str(steps), *TINY]


def _unstarted_run(path: Path) -> Path:
    """The folder a run killed before its first checkpoint leaves."""
    create_run_dir(path, RunConfig(), TOKENIZERS.get("char").build(["abc"], 0))
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    (path / "checkpoints" / ".tmp-step_00000004-123-abcd-host").mkdir(parents=True)
    return path


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ---- 1. the token cache is keyed on content; a run knows its data --------------------------

def test_a_file_edited_with_size_and_mtime_kept_is_tokenised_again(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh\n" * 200)
    cfg = DataConfig(data=str(f), tokenizer="byte")
    first = np.array(prepare_data(cfg).train)
    st = f.stat()
    f.write_text("hgfedcba\n" * 200)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `cp -p` / `rsync -t` do
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    second = np.array(prepare_data(cfg).train)
    assert bytes(first[:9].astype(np.uint8)) == b"abcdefgh\n"
    assert bytes(second[:9].astype(np.uint8)) == b"hgfedcba\n"


def test_content_hash_streams_past_chunk_boundaries(tmp_path):
    f = tmp_path / "big.txt"
    blob = bytearray(b"x" * (2 * (1 << 20) + 123))
    f.write_bytes(blob)
    before = content_hash([f], f)
    blob[-1:] = b"y"  # a change in the last, partial chunk
    f.write_bytes(blob)
    assert content_hash([f], f) != before
    assert content_hash([f], f) == content_hash([f], f)


def test_data_identity_notices_an_edit_and_resume_refuses_it(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text(TEXT)
    saved = data_identity(load_corpus(str(f)).fingerprint)
    assert len(saved) == 16 and saved == data_identity(load_corpus(str(f)).fingerprint)
    check_data_identity(saved, saved, str(f))
    check_data_identity(None, saved, str(f))  # a run from before identities: not checked
    f.write_text(TEXT.replace("question", "QUESTION"))
    now = data_identity(load_corpus(str(f)).fingerprint)
    with pytest.raises(DlmError) as e:
        check_data_identity(saved, now, str(f))
    assert str(e.value) == (
        f"the training data {f} changed since this run started (content hash {saved}, now {now}): "
        "resume would train on different data; start a new run or restore the file"
    )


def test_the_run_marker_keeps_the_data_identity(tmp_path):
    from dlm.checkpoint import run_data_identity

    create_run_dir(tmp_path / "r", RunConfig(), TOKENIZERS.get("byte").build([], 0), data_identity="0123456789abcdef")
    assert run_data_identity(tmp_path / "r") == "0123456789abcdef"
    create_run_dir(tmp_path / "old", RunConfig(), TOKENIZERS.get("byte").build([], 0))
    assert run_data_identity(tmp_path / "old") is None


# ---- 2. temporary cache folders of dead writers are cleaned, live writers' are not ----------

def test_stale_token_cache_temp_folders_are_removed_live_ones_kept(tmp_path):
    tokens = cache_root() / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {
            "dead": tokens / f".tmp-{int(dead.stdout)}-aaaa0000-{HOST}",
            "live": tokens / f".tmp-{live.pid}-bbbb0000-{HOST}",
            "old_unnamed": tokens / ".tmp-k2j3h4",  # an older dlm's mkdtemp name, long idle
            "other_host_busy": tokens / ".tmp-4242-cccc0000-some-other-host",
        }
        for folder in folders.values():
            folder.mkdir()
            (folder / "train.bin").write_bytes(b"\0\0")
        two_hours_ago = time.time() - 7200
        for p in (folders["old_unnamed"], folders["old_unnamed"] / "train.bin"):
            os.utime(p, (two_hours_ago, two_hours_ago))
        f = tmp_path / "t.txt"
        f.write_text("some text to tokenise\n" * 50)
        prepare_data(DataConfig(data=str(f), tokenizer="byte"))
        left = {name for name, folder in folders.items() if folder.exists()}
        assert left == {"live", "other_host_busy"}
    finally:
        live.kill()
        live.wait()
        for folder in tokens.glob(".tmp-*"):
            shutil.rmtree(folder)


# ---- 3. one writer per run folder -------------------------------------------------------------

HOLD_LOCK = """
import sys
from dlm.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""


@contextmanager
def _held_by_another_process(run_dir: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_run_folder_locked_by_another_process_is_refused_until_it_ends(trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    with _held_by_another_process(run_dir) as holder:
        with pytest.raises(DlmError) as e:
            with run_lock(run_dir):
                pass
        assert str(e.value) == f"{run_dir} is in use by another dlm process (pid {holder.pid}); wait for it or stop it"
        holder.stdin.close()  # the holder finishes normally
        assert holder.wait(timeout=30) == 0
    with run_lock(run_dir):
        with run_lock(run_dir):  # nested in one process: no deadlock
            pass


def test_a_killed_holder_leaves_the_run_folder_free(trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    with _held_by_another_process(run_dir) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with run_lock(run_dir):
            pass


def test_a_second_train_on_a_live_run_stops_with_one_line(corpus, tmp_path, capsys):
    """A live run that has not checkpointed yet must not be mistaken for an abandoned one."""
    out = _unstarted_run(tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    with _held_by_another_process(out) as holder:
        one_line_error(*run(_train_argv(corpus, out), capsys)[::2], f"in use by another dlm process (pid {holder.pid})")
    assert (out / "metrics.jsonl").read_text() == before


def test_a_lock_on_a_new_folder_leaves_nothing_when_the_run_fails(tmp_path):
    with pytest.raises(DlmError):
        with run_lock(tmp_path / "new"):
            raise DlmError("bad data")
    assert not (tmp_path / "new").exists()


# ---- 4. run files follow the umask ------------------------------------------------------------

@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_files_and_folders_follow_the_umask(corpus, tmp_path, capsys, mask, file_mode, dir_mode):
    out = tmp_path / "run"
    with _umask(mask):
        code, _, err = run(_train_argv(corpus, out), capsys)
        assert code == 0, err
    paths = [out, *out.rglob("*")]
    assert any(p.name == "tokenizer.json" for p in paths) and any(p.name.startswith("step_") for p in paths)
    for p in paths:
        want = dir_mode if p.is_dir() else file_mode
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_atomic_write_and_cache_entries_follow_the_umask(tmp_path):
    with _umask(0o022):
        atomic_write_text(tmp_path / "a.txt", "x")
        f = tmp_path / "t.txt"
        f.write_text("cache entries for colleagues\n" * 20)
        data = prepare_data(DataConfig(data=str(f), tokenizer="byte"))
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    entry = Path(data.train.filename).parent
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()} == {0o644}


# ---- 5. `latest` must name a checkpoint of its own run ---------------------------------------

@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp/elsewhere", "step_00000002/../../elsewhere", "a/b", ""])
def test_latest_naming_something_outside_the_run_is_refused(trained, tmp_path, capsys, name):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text(name + "\n")
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], "latest", "not a checkpoint of this run")
    with pytest.raises(DlmError, match="not a checkpoint of this run"):
        load_checkpoint(run_dir)


def test_a_missing_latest_falls_back_to_the_newest_complete_checkpoint(trained, tmp_path):
    """Killed between renaming the first checkpoint into place and writing `latest`."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run_dir).name == "step_00000002" and has_checkpoint(run_dir)


# ---- 6. files of the wrong JSON shape ---------------------------------------------------------

@pytest.mark.parametrize(
    "content,fragment",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"chars": ["a"]}', "no 'kind' field"),
        ('{"kind": 5}', "'kind' field must be a str"),
        ('{"kind": "wordpiece"}', "unknown tokenizer 'wordpiece'"),
        ('{"kind": "char", "chars": 5}', "'chars' field must be a list"),
        ('{"kind": "char", "chars": [1, 2]}', "distinct single characters"),
        ('{"kind": "char", "chars": ["ab", "a"]}', "distinct single characters"),
        ('{"kind": "char"}', "no 'chars' field"),
        ('{"kind": "bpe", "tokenizer": {}}', "'tokenizer' field must be a str"),
        ('{"kind": "bpe", "tokenizer": "not json"}', "not a Hugging Face tokenizer"),
        ('{"kind": "char", "chars": ["a"', "is corrupt"),
    ],
)
def test_tokenizer_files_of_the_wrong_shape(trained, tmp_path, capsys, content, fragment):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DlmError, match="tokenizer") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and fragment in str(e.value)
    run_dir = shutil.copytree(trained, tmp_path / "run")
    shutil.copy(path, run_dir / "tokenizer.json")
    one_line_error(*run(["sample", str(run_dir)], capsys)[::2], str(run_dir / "tokenizer.json"), fragment)


def test_a_bpe_tokenizer_without_end_of_text_is_refused(tmp_path):
    state = TOKENIZERS.get("bpe").build(["some text to learn merges from " * 50], 300).state()
    state["tokenizer"] = state["tokenizer"].replace("<|endoftext|>", "<|something|>")
    (tmp_path / "tok.json").write_text(json.dumps({"kind": "bpe", **state}))
    with pytest.raises(DlmError, match="has no <|endoftext|> token"):
        load_tokenizer(tmp_path / "tok.json")


@pytest.mark.parametrize("content", ['["dlm-run/2"]', "{}", '{"family": "mdlm"}', '"dlm-run/2"', "{"])
def test_run_markers_of_the_wrong_shape(trained, tmp_path, capsys, content):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    (run_dir / "dlm-run.json").write_text(content)
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], str(run_dir / "dlm-run.json"), "corrupt")
    one_line_error(*run(["train", "--out", str(run_dir), "--resume", "--steps", "4"], capsys)[::2], "dlm-run.json")


@pytest.mark.parametrize("content", ["[2]", "{}", '{"step": "two"}', '{"step": [2]}', "null", "{"])
def test_checkpoint_meta_of_the_wrong_shape(trained, tmp_path, capsys, content):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    meta = run_dir / "checkpoints" / "step_00000002" / "meta.json"
    meta.write_text(content)
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], str(meta), "corrupt")


def test_a_trainer_state_that_is_not_a_dict_is_corrupt(trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    torch.save([1, 2], run_dir / "checkpoints" / "step_00000002" / "trainer.pt")
    with pytest.raises(DlmError, match="trainer.pt is corrupt: it holds a list"):
        load_checkpoint(run_dir)


@pytest.mark.parametrize("damage", ["shape", "truncate"])
def test_a_damaged_token_cache_entry_is_rebuilt(tmp_path, damage):
    f = tmp_path / "t.txt"
    f.write_text("a damaged cache entry is tokenised again\n" * 30)
    cfg = DataConfig(data=str(f), tokenizer="byte")
    first = np.array(prepare_data(cfg).train)
    entry = Path(prepare_data(cfg).train.filename).parent
    if damage == "shape":
        (entry / "meta.json").write_text("[1, 2, 3]")
    else:
        (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:10])
    assert np.array_equal(np.array(prepare_data(cfg).train), first)


# ---- 7. metrics.jsonl as a crash leaves it ----------------------------------------------------

def test_metrics_lines_drop_a_partial_last_line_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics_lines(path, 5) == []
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_bytes(("\n".join(rows) + "\n").encode() + b'not json\n{"step": true}\n[3]\n{"step": 5, "loss": 0.\xe2')
    assert read_metrics_lines(path, 3) == rows[:3]
    assert read_metrics_lines(path, 10) == rows
    trim_metrics(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"


def test_resume_after_a_crash_mid_metrics_line(trained, tmp_path, capsys):
    """What MetricsLog must do on resume (it calls trim_metrics): a cut last line is no error."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.9')
    trim_metrics(run_dir / "metrics.jsonl", load_checkpoint(run_dir, with_trainer=False).step)
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]


# ---- 8. file system errors at the edges: one line naming the path and the cause --------------

def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_out_naming_an_existing_file(corpus, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("mine")
    one_line_error(*run(_train_argv(corpus, out), capsys)[::2], f"{out} is a file, not a folder")
    assert out.read_text() == "mine"


def test_out_under_a_file(corpus, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    out = tmp_path / "a-file" / "run"
    one_line_error(*run(_train_argv(corpus, out), capsys)[::2], f"{out}", "not a directory")


def test_dlm_cache_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("mine")
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "a-file" / "cache"))
    f = tmp_path / "t.txt"
    f.write_text("text\n" * 100)
    with pytest.raises(DlmError, match="not a directory .*DLM_CACHE"):
        prepare_data(DataConfig(data=str(f), tokenizer="byte"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: by mode, or (as root) a read-only mount."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_out_and_cache_in_a_read_only_place(corpus, read_only_dir, capsys, monkeypatch):
    out = read_only_dir / "run"
    one_line_error(*run(_train_argv(corpus, out), capsys)[::2], str(out), "read-only file system" if os.geteuid() == 0
                   else "permission denied")
    monkeypatch.setenv("DLM_CACHE", str(read_only_dir / "cache"))
    one_line_error(*run(_train_argv(corpus, read_only_dir.parent / "run2"), capsys)[::2], "DLM_CACHE")
    assert not (read_only_dir.parent / "run2").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    monkeypatch.setattr(ckpt_mod.torch, "save", _disk_full)
    with pytest.raises(DlmError) as e:
        save_checkpoint(run_dir, 4, torch.nn.Linear(2, 2), None, {"step": 4})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value) == f"cannot write {run_dir / 'checkpoints' / 'step_00000004'}: no space left on device"
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--steps", "3", "--quiet"], capsys)
    one_line_error(code, err, "no space left on device")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert load_checkpoint(run_dir).step == 2


def test_a_full_disk_while_writing_text_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(DlmError, match=f"cannot write {path}: no space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_full_disk_while_creating_a_run_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(TOKENIZERS.get("byte"), "save", lambda self, path: _disk_full())
    with pytest.raises(OSError):  # the tokenizer's own write fails after config.yaml was written
        create_run_dir(tmp_path / "run", RunConfig(), TOKENIZERS.get("byte").build([], 0))
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB file system (root only: it is a tmpfs mount)."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to make a real full disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_really_full_disk(small_fs, tmp_path, monkeypatch):
    """torch.save, safetensors and numpy report ENOSPC without an errno: the line still says it."""
    save_checkpoint(small_fs, 1, torch.nn.Linear(4, 4), None, {"step": 1})
    with pytest.raises(DlmError, match="no space left on device"):
        save_checkpoint(small_fs, 2, torch.nn.Linear(1024, 512), None, {"step": 2})  # 2 MiB of weights
    assert load_checkpoint(small_fs).step == 1
    assert sorted(p.name for p in (small_fs / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    monkeypatch.setenv("DLM_CACHE", str(small_fs / "cache"))
    f = tmp_path / "big.txt"
    f.write_text("x" * (1 << 20))  # 2 MiB of uint16 tokens
    with pytest.raises(DlmError, match="no space left on device"):
        prepare_data(DataConfig(data=str(f), tokenizer="byte"))
    assert list((small_fs / "cache" / "tokens").iterdir()) == []


# ---- 9. a run killed before its first checkpoint can be started again ------------------------

def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(corpus, tmp_path, capsys):
    out = _unstarted_run(tmp_path / "run")
    one_line_error(*run(["train", "--out", str(out), "--resume", "--quiet"], capsys)[::2],
                   "no checkpoint yet", "same `dlm train` command, without --resume")
    code, _, err = run(_train_argv(corpus, out), capsys)
    assert code == 0, err
    assert load_checkpoint(out).step == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    one_line_error(*run(_train_argv(corpus, out), capsys)[::2], "already holds a run")  # now it has a checkpoint


def test_a_sigkilled_first_run_starts_again(corpus, tmp_path, capsys):
    """The real thing: SIGKILL a `dlm train` before its first checkpoint, run the command again."""
    out = tmp_path / "run"
    argv = [*_train_argv(corpus, out, steps=10**6), "train.time_budget_s=1"]  # checkpoints after 1 s
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlm", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "dlm-run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "dlm-run.json").exists() and not has_checkpoint(out)
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert load_checkpoint(out).step > 0


# ---- 10. bad input that ended in a traceback or a message blaming the wrong thing -------------

def test_a_bpe_vocab_size_the_data_cannot_reach_is_one_line(corpus, tmp_path, capsys):
    import re

    out = tmp_path / "run"
    argv = [*_train_argv(corpus, out), "--tokenizer", "bpe"]  # the last --tokenizer wins
    code, _, err = run([*argv, "--vocab-size", "5000"], capsys)
    one_line_error(code, err, f"the BPE vocabulary of {corpus} reached only", "fewer than --vocab-size 5000")
    reached = int(re.search(r"pass --vocab-size (\d+) or less", err).group(1))
    assert 258 <= reached < 5000 and not out.exists()
    code, _, err = run([*argv, "--vocab-size", "5000"], capsys)  # the too-small BPE is cached: same line at once
    one_line_error(code, err, f"pass --vocab-size {reached} or less")
    code, _, err = run([*argv, "--vocab-size", str(reached)], capsys)
    assert code == 0, err
    assert load_tokenizer(out / "tokenizer.json").vocab_size == reached


@pytest.mark.parametrize("kind", ["char", "byte", "gpt2"])
def test_tokenizers_of_a_fixed_size_ignore_vocab_size(corpus, kind):
    from dlm.data.cache import build_tokenizer

    assert build_tokenizer(kind, load_corpus(str(corpus), 0.05), 10**6, 0.05).vocab_size < 10**6


@pytest.mark.parametrize("command", ["sample", "eval", "lm-eval"])
@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64), str(10**30)])
def test_a_seed_beyond_64_bits_or_negative_is_one_line(trained, capsys, command, seed):
    extra = ["--tasks", "lambada_openai"] if command == "lm-eval" else []
    one_line_error(*run([command, str(trained), *extra, "--seed", seed], capsys)[::2],
                   f"--seed must be in [0, {2**63 - 1}], got {seed}")


def test_sampling_more_than_memory_holds_is_one_line(trained, capsys):
    """10⁹ samples of 32 tokens: the allocator refuses 238 GiB at once (more than any test machine has)."""
    one_line_error(*run(["sample", str(trained), "--num", str(10**9)], capsys)[::2],
                   "out of memory: tried to allocate", "GiB", "(lower --batch-size / --num / train.batch_size)")


def test_a_model_larger_than_memory_leaves_no_run_folder(corpus, tmp_path, capsys):
    """d_model 2²⁰: the first block's weights (terabytes) are refused while the model is built,
    before the run folder is written, so nothing is left."""
    out = tmp_path / "run"
    one_line_error(*run([*_train_argv(corpus, out), f"model.d_model={2**20}"], capsys)[::2],
                   "out of memory: tried to allocate")
    assert not out.exists()


def test_a_batch_larger_than_memory_leaves_a_restartable_run_folder(corpus, tmp_path, capsys):
    """The GPT-2 vocabulary's logits for 8,192 × 32 positions (49 GiB) are refused at the first
    step. The run folder was written just before it (config, tokenizer, marker) but holds no
    checkpoint: such a folder is started afresh by the next `dlm train` into it, so the user
    only lowers the batch size."""
    out = tmp_path / "run"
    argv = [*_train_argv(corpus, out), "--family", "ar", "--tokenizer", "gpt2", "model.d_model=8", "model.n_head=2",
            "train.fused_head=false"]  # the fused head never forms those logits (it fits in chunks)
    one_line_error(*run([*argv, "--batch-size", "8192"], capsys)[::2],
                   "out of memory: tried to allocate 49.1 GiB", "lower --batch-size")
    assert not has_checkpoint(out)
    code, _, err = run(argv, capsys)  # TINY's --batch-size 8
    assert code == 0, err
    assert load_checkpoint(out).step == 2


@pytest.mark.parametrize("other", ["ar", "usdm"])
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_config_edited_to_another_family_says_so(trained, tmp_path, capsys, other, command):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("family: mdlm", f"family: {other}"))
    one_line_error(*run([command, str(run_dir)], capsys)[::2],
                   f"{config} says family '{other}' but the run was trained as a 'mdlm' model",
                   str(run_dir / "dlm-run.json"))


def test_a_checkpoint_that_does_not_fit_names_the_likely_causes(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("size: tiny", "size: mini"))
    one_line_error(*run(["sample", str(run_dir)], capsys)[::2], "does not fit this model",
                   "a different family, tokenizer or model size?")
    shutil.copy(trained / "config.yaml", config)
    TOKENIZERS.get("byte").build([], 0).save(run_dir / "tokenizer.json")
    config.write_text(config.read_text().replace("tokenizer: char", "tokenizer: byte"))
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], "do not belong together",
                   "a different family, tokenizer or model size?")


# ---- 11. the edges wired into the training loop, end to end ------------------------------------


def test_resume_refuses_training_data_edited_with_size_and_mtime_kept(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert run(_train_argv(data, out), capsys)[0] == 0
    st = data.stat()
    data.write_text(TEXT.replace("question", "Question"))  # same size …
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # … same modification time
    before = (out / "checkpoints" / "latest").read_text()
    one_line_error(*run(["train", "--out", str(out), "--resume", "--steps", "4", "--quiet"], capsys)[::2],
                   "changed since this run started")
    assert (out / "checkpoints" / "latest").read_text() == before


def test_a_resume_while_another_process_writes_the_run_stops_with_one_line(trained, tmp_path, capsys):
    """Two writers of one run: the second `--resume` is refused, the run left as it was."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    before = (run_dir / "checkpoints" / "latest").read_text()
    with _held_by_another_process(run_dir) as holder:
        one_line_error(*run(["train", "--out", str(run_dir), "--resume", "--steps", "4", "--quiet"], capsys)[::2],
                       f"in use by another dlm process (pid {holder.pid})")
    assert (run_dir / "checkpoints" / "latest").read_text() == before
    assert run(["train", "--out", str(run_dir), "--resume", "--steps", "4", "--quiet"], capsys)[0] == 0  # free again


# ---- 12. checkpoints are byte-reproducible (issue 19, item 7) ----------------------------------

_SAVE_SCRIPT = r"""
import sys
from pathlib import Path
import torch
from dlm.checkpoint import save_checkpoint, save_tensors
from dlm.distributed import save_shards

out = Path(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(2, 4)).sum().backward()
opt.step()
trainer = {"optimizer": opt.state_dict(), "loader": {"epoch": 1, "order": [3, 1, 2]},
           "torch_rng": torch.get_rng_state(), "cuda_rng": None, "tokens": 96,
           "elapsed_s": float(sys.argv[2]), "untimed_s": 0.0, "untimed_tokens": 0}
ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
save_checkpoint(out, 3, model, ema, trainer)
save_tensors({"w": torch.ones(2)}, out / "many.safetensors", {f"key{i}": str(i) for i in range(8)})
save_shards({"optimizer": opt.state_dict()}, out / "dcp")  # what processes of a distributed run write
"""


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_state_saved_by_two_processes_gives_the_same_bytes(tmp_path):
    """Two processes with different hash seeds (Python's and, with them, safetensors' Rust hash
    maps, seeded per process) save one state: every file is byte for byte the same; only the
    wall-clock counters, in clock.json, may differ."""
    for seed, elapsed in (("1", "1.5"), ("2", "2.25")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-W", "ignore", "-c", _SAVE_SCRIPT, str(tmp_path / seed), elapsed], check=True,
                       env=env)
    a, b = _hashes(tmp_path / "1"), _hashes(tmp_path / "2")
    assert a.keys() == b.keys() and {"checkpoints/step_00000003/clock.json", "dcp/.metadata"} <= set(a)
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == ["checkpoints/step_00000003/clock.json"], differ
    header = (tmp_path / "1" / "many.safetensors").read_bytes()[8:200]
    assert header.startswith(b'{"__metadata__":{"key0":"0","key1":"1","key2":"2"'), header
    loaded = load_checkpoint(tmp_path / "2")
    assert loaded.trainer["elapsed_s"] == 2.25 and loaded.trainer["tokens"] == 96  # clock.json read back


def test_a_checkpoint_from_before_clock_json_keeps_its_counters(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    step = latest_checkpoint(run_dir)
    old = {**torch.load(step / "trainer.pt", weights_only=True), **json.loads((step / "clock.json").read_text())}
    old["elapsed_s"] = 12.5
    torch.save(old, step / "trainer.pt")  # the layout checkpoints had before clock.json
    (step / "clock.json").unlink()
    assert load_checkpoint(run_dir).trainer["elapsed_s"] == 12.5
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((latest_checkpoint(run_dir) / "clock.json").read_text())["elapsed_s"] > 12.5  # carried on


@pytest.mark.parametrize("content", ["[1]", "{", '{"elapsed_s": "soon"}'])
def test_a_damaged_clock_file_is_one_line(trained, tmp_path, capsys, content):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    clock = latest_checkpoint(run_dir) / "clock.json"
    clock.write_text(content)
    one_line_error(*run(["train", "--out", str(run_dir), "--resume", "--steps", "3", "--quiet"], capsys)[::2],
                   str(clock), "corrupt")
