"""`edgediff export` never deletes what it must not (SOURCE, folders around it, the user's own files),
refuses bad OUTs and opsets before loading anything, serialises exports to one OUT with a lock, and
keeps stderr free of diffusers' "Multiple distributions" noise. Only the last test runs a real export."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from cli_check import assert_one_line_error, run_cli
from conftest import needs_torch
from edgediff.runtime import ExportError
from edgediff.runtime.model_folder import sha256_file

pytestmark = needs_torch

fcntl = pytest.importorskip("fcntl") if os.name == "posix" else None


class _Stop(ExportError):
    """Raised by the patched loader: the export got past every check."""


@pytest.fixture()
def src(tiny_source, tmp_path):
    """A private copy of the tiny diffusers folder (destructive tests never touch the session fixture)."""
    return shutil.copytree(tiny_source("sd1"), tmp_path / "src")


@pytest.fixture()
def no_load(monkeypatch):
    """Refusals must come before the (slow) model load: loading fails the test."""

    def load(*a, **k):
        pytest.fail("the model was loaded before the refusal")

    monkeypatch.setattr("edgediff.export._load", load)


@pytest.fixture()
def stop_at_load(monkeypatch):
    """Accepted inputs stop at the load with _Stop; the call records what it saw."""
    seen = []

    def load(source, device):
        seen.append(source)
        raise _Stop("stopped at the load")

    monkeypatch.setattr("edgediff.export._load", load)
    return seen


def _hashes(root):
    """relative path -> sha256 of every file under root (symlinks recorded by target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if any(t in p.name for t in (".partial-", ".old-", ".lock")))


def _refused(src, out, force, *needles):
    """The API raises ExportError naming ``needles``; the CLI prints one line; nothing changed anywhere."""
    from edgediff.export import export_model

    top = src.parent
    before = _hashes(top)
    with pytest.raises(ExportError) as info:
        export_model(src, out, force=force)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))
    assert_one_line_error(*run_cli("export", src, out, *(["--force"] if force else [])), *needles)
    assert _hashes(top) == before
    assert _leftovers(top) == [] and _leftovers(src) == []


def _onnx_folder(path, class_name="ORTStableDiffusionPipeline", extra=()):
    """A folder shaped like an ONNX export (what --force may replace)."""
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        (path / comp).mkdir(parents=True)
        (path / comp / "model.onnx").write_bytes(b"not really onnx")
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for rel in extra:
        (path / rel).write_text("x")
    return path


# ---- OUT versus SOURCE -----------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("form", ["same", "dotdot", "relative", "symlink", "parent", "grandparent"])
def test_out_is_or_contains_source(src, tmp_path, monkeypatch, no_load, form, force):
    monkeypatch.chdir(tmp_path)
    if form == "symlink":
        (tmp_path / "link").symlink_to(src, target_is_directory=True)
    out = {
        "same": src,
        "dotdot": src / ".." / "src",
        "relative": "src",
        "symlink": tmp_path / "link",
        "parent": tmp_path,
        "grandparent": tmp_path.parent / tmp_path.name / "src" / ".." / "..",
    }[form]
    needle = "contains SOURCE" if form in ("parent", "grandparent") else "is SOURCE"
    _refused(src, out, force, needle, "would delete the source", "choose another OUT")


def test_force_never_replaces_a_folder_inside_source(src, no_load):
    _refused(src, src / "unet", True, "is inside SOURCE", "choose another OUT")
    _refused(src, src / "unet", False, "already exists", "--force")


# ---- OUT that is not an ONNX model folder ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["own-files", "model-index-only", "onnx-with-torch-weights", "diffusers-folder"])
def test_force_never_replaces_a_non_model_folder(src, tmp_path, tiny_source, no_load, kind):
    out = tmp_path / "mine"
    if kind == "own-files":
        (out / "photos").mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    elif kind == "model-index-only":
        out.mkdir()
        (out / "model_index.json").write_text(json.dumps({"_class_name": "OnnxStableDiffusionPipeline"}))
        (out / "thesis.tex").write_text("mine")
    elif kind == "onnx-with-torch-weights":  # a diffusers folder that also holds an ONNX UNet
        _onnx_folder(out, "StableDiffusionPipeline", extra=["unet/diffusion_pytorch_model.safetensors"])
    else:
        shutil.copytree(tiny_source("sd2"), out)
    _refused(src, out, True, "is not an ONNX model folder", "choose another OUT or delete it yourself")


@pytest.mark.parametrize("force", [False, True])
def test_out_is_a_regular_file(src, tmp_path, no_load, force):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"precious")
    _refused(src, out, force, "is a file, not a folder", "choose another OUT or delete the file yourself")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "kind", ["empty", "edgediff", "optimum-export", "ort-pipeline", "onnx-pipeline", "symlink-to-model"]
)
def test_force_accepts_onnx_model_folders(src, tmp_path, stop_at_load, kind):
    """These get past every check (to the load, patched to stop there) and are untouched by it."""
    from edgediff.export import export_model

    out = tmp_path / "model"
    if kind == "empty":
        out.mkdir()
    elif kind == "edgediff":
        _onnx_folder(out, "OnnxStableDiffusionPipeline", extra=["edgediff.json"])
    elif kind == "optimum-export":  # optimum's main_export keeps the torch pipeline's class name
        _onnx_folder(out, "StableDiffusionPipeline")
    elif kind == "ort-pipeline":
        _onnx_folder(out, "ORTStableDiffusionPipeline")
    elif kind == "onnx-pipeline":
        _onnx_folder(out, "OnnxStableDiffusionPipeline")
    else:
        _onnx_folder(tmp_path / "real")
        out.symlink_to(tmp_path / "real", target_is_directory=True)
    before = _hashes(tmp_path)
    with pytest.raises(ExportError, match="already exists"):
        export_model(src, out)
    with pytest.raises(_Stop):
        export_model(src, out, force=True)
    assert len(stop_at_load) == 1
    assert _hashes(tmp_path) == before and _leftovers(tmp_path) == []


# ---- opset -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 13, 21, 23])
def test_opset_out_of_range(src, tmp_path, no_load, opset):
    from edgediff.export import export_model

    with pytest.raises(ExportError, match=f"--opset {opset} is not supported; edgediff exports opsets 14 to 20"):
        export_model(src, tmp_path / "out", opset=opset)
    assert_one_line_error(*run_cli("export", src, tmp_path / "out", "--opset", opset), "opsets 14 to 20")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("opset", [14, 17, 20])
def test_opset_in_range_passes_the_check(src, tmp_path, stop_at_load, opset):
    from edgediff.export import export_model

    with pytest.raises(_Stop):
        export_model(src, tmp_path / "out", opset=opset)


# ---- one export per OUT --------------------------------------------------------------------------
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc.pid
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX")
def test_second_export_to_the_same_out_refuses(src, tmp_path, no_load, sleeper):
    """Another process holds .OUT.lock (as a running export does): refused at once, its files untouched."""
    out = tmp_path / "model"
    partial = tmp_path / f".model.partial-{sleeper}"  # the running export's work in progress
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "model.onnx").write_bytes(b"half")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / ".model.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = _hashes(tmp_path)
        from edgediff.export import export_model

        msg = f"another export to {out} is running (pid {holder.pid}); wait for it or choose another OUT"
        with pytest.raises(ExportError) as info:
            export_model(src, out)
        assert str(info.value) == msg
        assert_one_line_error(*run_cli("export", src, out), msg)
        assert _hashes(tmp_path) == before  # the holder's lock file and partial folder are untouched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX")
@pytest.mark.parametrize("stop", [_Stop, KeyboardInterrupt])
def test_partials_of_dead_exports_go_and_the_lock_is_released(src, tmp_path, monkeypatch, sleeper, stop):
    from edgediff.export import export_model

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = tmp_path / "deep" / f".model.partial-{sleeper}"
    gone = tmp_path / "deep" / f".model.partial-{dead_pid}"
    foreign = tmp_path / "deep" / ".model.partial-notapid"
    for p in (live, gone, foreign):
        (p / "unet").mkdir(parents=True)
        (p / "unet" / "model.onnx").write_bytes(b"half")
    live_before = _hashes(live)
    held = []

    def load(source, device):  # the lock is held while the model loads
        fd = os.open(tmp_path / "deep" / ".model.lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(os.read(fd, 100).decode().strip())
        os.close(fd)
        raise stop("stop")

    monkeypatch.setattr("edgediff.export._load", load)
    with pytest.raises(stop):
        export_model(src, tmp_path / "deep" / "model")
    assert held == [str(os.getpid())]
    assert not gone.exists()
    assert _hashes(live) == live_before and foreign.is_dir()
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == sorted([live.name, foreign.name])  # no lock


@pytest.mark.parametrize("stop", [_Stop, KeyboardInterrupt])
def test_failed_export_removes_the_parents_it_created(src, tmp_path, monkeypatch, stop):
    from edgediff.export import export_model

    def load(source, device):
        assert (tmp_path / "a" / "b").is_dir()
        raise stop("stop")

    monkeypatch.setattr("edgediff.export._load", load)
    with pytest.raises(stop):
        export_model(src, tmp_path / "a" / "b" / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- the one real export ---------------------------------------------------------------------------
def test_real_export_replaces_an_onnx_folder_with_a_quiet_stderr(src, tmp_path):
    """A fresh process (diffusers imported for the first time) replaces an optimum-style folder with
    --force: exit 0, stderr free of "Multiple distributions found", SOURCE intact, nothing left behind."""
    out = _onnx_folder(tmp_path / "model", extra=["old.txt"])
    before = _hashes(src)
    cmd = [sys.executable, "-m", "edgediff.runtime.cli", "export", str(src), str(out), "--force", "--opset", "14"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Multiple distributions found" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == f"exported {src} -> {out}"
    assert not (out / "old.txt").exists()
    manifest = json.loads((out / "edgediff.json").read_text())
    assert manifest["opset"] == 14 and (out / "model_index.json").is_file()
    assert {rel: sha256_file(out / rel) for rel in manifest["files"]} == {
        rel: info["sha256"] for rel, info in manifest["files"].items()
    }
    assert _hashes(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "src"]
    if len(metadata.packages_distributions().get("optimum", [])) > 1:  # the check above can fail here
        plain = subprocess.run([sys.executable, "-c", "import diffusers.utils"], capture_output=True, text=True)
        assert "Multiple distributions found for package optimum" in plain.stderr
