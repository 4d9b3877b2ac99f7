"""The command line a person uses every day (issue 18), on the embedded model, torch-free: several images per run
and their file names, prompt files with one model load, output formats by extension with their parameters where
other tools read them, random seeds, --json, exit codes, shell completion, --threads, and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.runtime import Pipeline
from edgediff.runtime.cli import main
from edgediff.runtime.image import read_user_comment

PROMPT = "a red circle on a blue background"
FAST = ["--steps", "3"]


def run(*args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], **kw)
    return result.exit_code, result.output


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def record(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["edgediff"])


@pytest.fixture
def loads(monkeypatch):
    """Counts Pipeline.load calls (the model loads of a run)."""
    count = {"n": 0}
    original = Pipeline.load.__func__

    def counting(cls, *a, **k):
        count["n"] += 1
        return original(cls, *a, **k)

    monkeypatch.setattr(Pipeline, "load", classmethod(counting))
    return count


def test_several_images_get_consecutive_seeds_and_numbered_files(tmp_path, loads):
    os.chdir(tmp_path)
    code, out = run("generate", PROMPT, *FAST, "-n", "3", "--seed", "5")
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-000.png", "out-001.png", "out-002.png"]
    assert [record(tmp_path / f"out-00{i}.png")["seed"] for i in range(3)] == [5, 6, 7]
    assert loads["n"] == 1
    code, out = run("generate", PROMPT, *FAST, "--seed", "6", "-o", "single.png")
    assert code == 0 and np.array_equal(pixels("single.png"), pixels("out-001.png"))  # image i is seed + i


def test_seeds_list_and_pattern_fields(tmp_path):
    pattern = tmp_path / "o" / "{i:03d}-{seed}-{prompt}.png"
    code, out = run("generate", PROMPT, *FAST, "--seeds", "3,9", "-o", pattern)
    assert code == 0, out
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["000-3-a-red-circle-on-a-blue-background.png", "001-9-a-red-circle-on-a-blue-background.png"]


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_carry_the_parameters_in_exif_user_comment(tmp_path, ext):
    path = tmp_path / f"a{ext}"
    code, out = run("generate", PROMPT, *FAST, "--seed", "4", "-o", path, "--quality", "80")
    assert code == 0, out
    with Image.open(path) as im:
        assert im.format == ("WEBP" if ext == ".webp" else "JPEG")
        comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0"  # A1111's encoding (piexif's "unicode": UTF-16 big-endian)
    text = read_user_comment(comment)
    assert text.startswith(PROMPT + "\n") and "Seed: 4" in text and "Steps: 3" in text
    # --from-png reads it back: the same call, so the same pixels as a PNG made with it
    again, png = tmp_path / "again.png", tmp_path / "ref.png"
    assert run("generate", "--from-png", path, "-o", again)[0] == 0
    assert run("generate", PROMPT, *FAST, "--seed", "4", "-o", png)[0] == 0
    assert np.array_equal(pixels(again), pixels(png))


def test_quality_changes_the_jpeg(tmp_path):
    sizes = []
    for q in (20, 95):
        path = tmp_path / f"q{q}.jpg"
        assert run("generate", PROMPT, *FAST, "--seed", "1", "--width", "128", "--height", "128", "-o", path,
                   "--quality", q)[0] == 0  # fmt: skip
        sizes.append(path.stat().st_size)
    assert sizes[0] < sizes[1]


def test_seed_minus_one_is_random_printed_and_recorded(tmp_path):
    seeds = []
    for name in ("a.png", "b.png"):
        code, out = run("generate", PROMPT, *FAST, "--seed", "-1", "-o", tmp_path / name)
        assert code == 0, out
        printed = int(out.split("(seed ")[1].split(",")[0])
        assert record(tmp_path / name)["seed"] == printed and 0 <= printed < 2**32
        seeds.append(printed)
    code, out = run("generate", PROMPT, *FAST, "-o", tmp_path / "c.png")  # no --seed: random too
    assert code == 0 and record(tmp_path / "c.png")["seed"] == int(out.split("(seed ")[1].split(",")[0])


def test_prompt_file_makes_every_line_with_one_model_load(tmp_path, loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red circle on a blue background\n\n"
                       '--prompt "a small green triangle at the top" --steps 2 --seed 9 --n_iter 2 '
                       '--negative_prompt "blurry" --sampler_name "Euler a"\n', encoding="utf-8")  # fmt: skip
    code, out = run("generate", "--from-file", prompts, *FAST, "--seed", "1", "-o", tmp_path / "{line}-{i}.png",
                    "--json")  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    assert loads["n"] == 1  # one model load for the whole file
    assert report["files"] == [str(tmp_path / n) for n in ("2-0.png", "4-1.png", "4-2.png")]
    assert report["seeds"] == [1, 9, 10]
    first, second = report["parameters"][0], report["parameters"][1]
    assert first["num_inference_steps"] == 3 and second["num_inference_steps"] == 2
    assert second["negative_prompt"] == "blurry" and second["scheduler"] == "euler_a"
    assert all("load_unet" not in x["timings"] for x in report["images"])  # no image paid a load
    assert report["timings"]["model_load"] > 0 and report["images"][0]["line"] == 2


def test_jsonl_prompt_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "steps": 2, "num_images": 2, "seed": 3}\n'
                       '{"prompt": "a blue square", "guidance": 1.0}\n', encoding="utf-8")  # fmt: skip
    code, out = run("generate", "--from-file", prompts, "-o", tmp_path / "x.png", "--json", *FAST)
    assert code == 0, out
    report = json.loads(out)
    assert [Path(f).name for f in report["files"]] == ["x-000.png", "x-001.png", "x-002.png"]
    assert report["seeds"][:2] == [3, 4] and report["parameters"][2]["guidance_scale"] == 1.0


def test_json_output_is_one_object_on_stdout(tmp_path):
    code, out = run("generate", PROMPT, *FAST, "--seed", "2", "-o", tmp_path / "j.png", "--json")
    assert code == 0
    report = json.loads(out)  # nothing else on stdout
    assert report["files"] == [str(tmp_path / "j.png")] and report["seeds"] == [2]
    assert report["parameters"][0]["seed"] == 2 and report["interrupted"] is False
    assert set(report["timings"]) == {"model_load", "total"} and "total" in report["images"][0]["timings"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-o", "out.gif"], "cannot write .gif; use one of .png, .jpg, .jpeg, .webp"),
        (["-o", "out"], "cannot write a file without an extension"),
        (["-n", "2", "-o", "same-{prompt}.png"], "writes images 0 and 1 to the same file"),
        (["-o", "{size}.png"], "unknown field size"),
        (["-n", "0"], "--num-images must be 1 or more"),
        (["--seeds", "1,2", "-n", "3"], "--seeds gives 2 seeds but --num-images is 3"),
        (["--seeds", "1,x"], "--seeds takes whole numbers"),
        (["--quality", "0", "-o", "a.jpg"], "--quality must be an integer 1..100"),
        (["--threads", "0"], "--threads must be 1 or more"),
    ],
)
def test_bad_runs_fail_before_anything_is_generated(tmp_path, monkeypatch, args, needle):
    from cli_check import assert_one_line_error

    os.chdir(tmp_path)
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    assert_one_line_error(*run("generate", PROMPT, *FAST, *args), needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "holds no prompt"),
        ("# only a comment\n\n", "holds no prompt"),
        ('a cat\n--prompt "a dog" --bogus 3\n', "line 2: unknown option '--bogus'"),
        ('a cat\n--prompt "unclosed\n', "line 2: No closing quotation"),
        ("--steps 3\n", "line 1: no prompt"),
        (b"\xff\xfe bad", "not UTF-8 text"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, content, needle):
    from cli_check import assert_one_line_error

    path = tmp_path / "p.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line_error(*run("generate", "--from-file", path, "-o", tmp_path / "x.png"), needle)
    assert_one_line_error(*run("generate", "--from-file", tmp_path / "missing.txt"), "no such file")
    assert_one_line_error(*run("generate", "x", "--from-file", path), "leave PROMPT")


def test_interrupted_run_keeps_the_images_written_and_says_how_many(tmp_path, monkeypatch):
    original = Pipeline.__call__
    calls = {"n": 0}

    def interrupt_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Pipeline, "__call__", interrupt_third)
    code, out = run("generate", PROMPT, *FAST, "-n", "4", "-o", tmp_path / "i.png")
    assert code == 130
    assert "interrupted: 2 of 4 images written" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i-000.png", "i-001.png"]


def test_exit_codes(tmp_path, monkeypatch):
    from edgediff.runtime.errors import EngineRunError

    assert run("generate", PROMPT, "--no-such-option")[0] == 1  # usage errors are bad input too
    assert run("generate", "--steps", "0", PROMPT, "-o", tmp_path / "a.png")[0] == 1

    def fail(self, *a, **k):
        raise EngineRunError("unet failed in ONNX Runtime on inputs ...")

    monkeypatch.setattr(Pipeline, "__call__", fail)
    code, out = run("generate", PROMPT, "-o", tmp_path / "b.png")
    assert code == 3 and out.startswith("error: unet failed")


def test_threads_on_generate(tmp_path):
    code, out = run("generate", PROMPT, *FAST, "--seed", "1", "--threads", "1", "-o", tmp_path / "t.png")
    assert code == 0, out
    code, out = run("generate", PROMPT, *FAST, "--seed", "1", "-o", tmp_path / "u.png")
    assert np.array_equal(pixels(tmp_path / "t.png"), pixels(tmp_path / "u.png"))


def test_long_prompt_warning_quotes_the_words_dropped(tmp_path, caplog):
    long = " ".join(["a red circle on a blue background"] * 12) + " Zebra Tail at the end"
    result = CliRunner().invoke(main, ["generate", long, *FAST, "-o", str(tmp_path / "l.png")])
    assert result.exit_code == 0
    (message,) = [r.getMessage() for r in caplog.records if "tokens dropped" in r.getMessage()]
    assert "longer than the model's 77 tokens" in message and "</w>" not in message and "Zebra" in message
    assert message.endswith("(shorten the prompt to 77 tokens or move what matters to its start)")


def test_shell_completion_through_click():
    exe = Path(sys.executable).with_name("edgediff")
    if not exe.exists():
        pytest.skip(f"no edgediff command beside {sys.executable} (install the package)")
    env = {**os.environ, "_EDGEDIFF_COMPLETE": "bash_source"}
    script = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "_edgediff_completion" in script and "complete " in script
    env = {**os.environ, "_EDGEDIFF_COMPLETE": "bash_complete", "COMP_WORDS": "edgediff gen", "COMP_CWORD": "1"}
    words = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "generate" in words
