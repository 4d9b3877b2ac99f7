"""LoRA files read with numpy alone (``runtime/lora.py``): the safetensors container (bf16 included), the kohya,
LoCon and diffusers/PEFT formats, ΔW, and every bad file refused by name. Torch-free; the files are written here
byte by byte in the safetensors layout (and, where the package is installed, cross-checked with safetensors)."""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest

from edgediff.runtime.lora import LoraFileError, read_lora, read_safetensors

RNG = np.random.default_rng(0)


def write_safetensors(path, tensors: dict, metadata: dict | None = None, bf16: tuple = ()) -> None:
    """The safetensors layout: u64 header length, JSON header, raw little-endian data (names in ``bf16`` stored
    as bf16, the fp32 values' top halves)."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        if name in bf16:
            raw = (np.asarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            dtype = "BF16"
        else:
            value = np.asarray(value)
            raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
            dtype = {"float32": "F32", "float16": "F16", "int64": "I64"}[value.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(np.shape(value)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _bf16_exact(x):
    """x rounded down to what bf16 holds, so a bf16 round trip is exact."""
    return (np.asarray(x, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


# ---- the container -----------------------------------------------------------------------------------------
def test_container_round_trip_with_bf16_and_metadata(tmp_path):
    a = RNG.standard_normal((4, 8)).astype(np.float32)
    b = _bf16_exact(RNG.standard_normal((3, 5)))
    h = RNG.standard_normal((2, 2)).astype(np.float16)
    write_safetensors(tmp_path / "x.safetensors", {"a": a, "b": b, "h": h, "alpha": np.float32(4.0)},
                      {"ss_network_alpha": "4"}, bf16=("b",))  # fmt: skip
    tensors, metadata = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(tensors["a"], a)
    np.testing.assert_array_equal(tensors["b"], b)  # bf16 widened to fp32 exactly
    assert tensors["b"].dtype == np.float32 and tensors["h"].dtype == np.float16
    assert tensors["alpha"].shape == () and float(tensors["alpha"]) == 4.0
    assert metadata == {"ss_network_alpha": "4"}


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors not installed")
def test_reads_what_the_safetensors_package_writes(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"x": RNG.standard_normal((3, 4)).astype(np.float32), "y": np.arange(6, dtype=np.int64).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"k": "v"})
    ours, metadata = read_safetensors(tmp_path / "s.safetensors")
    assert metadata == {"k": "v"} and set(ours) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(ours[k], tensors[k])


def test_bad_files_are_refused_by_name(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(LoraFileError, match=r"truncated\.safetensors: tensor .* truncated or corrupt"):
        read_safetensors(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        read_safetensors(tiny)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    with pytest.raises(LoraFileError, match="corrupt safetensors header"):
        read_safetensors(junk)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(LoraFileError, match="truncated"):
        read_safetensors(huge)
    with pytest.raises(LoraFileError, match=r"pickled PyTorch file.*unpickling runs code"):
        read_safetensors(tmp_path / "style.ckpt")
    with pytest.raises(LoraFileError, match="does not exist"):
        read_safetensors(tmp_path / "missing.safetensors")


# ---- formats -------------------------------------------------------------------------------------------------
def _kohya_tensors(rank=4):
    down = RNG.standard_normal((rank, 8)).astype(np.float32)
    up = RNG.standard_normal((6, rank)).astype(np.float32)
    conv_down = RNG.standard_normal((rank, 3, 3, 3)).astype(np.float32)
    conv_up = RNG.standard_normal((5, rank, 1, 1)).astype(np.float32)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {
        f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up, f"{q}.alpha": np.float32(8.0),
        f"{conv}.lora_down.weight": conv_down, f"{conv}.lora_up.weight": conv_up,
        f"{te}.lora_down.weight": down, f"{te}.lora_up.weight": up, f"{te}.alpha": np.float32(2.0),
    }  # fmt: skip


def test_kohya_linear_conv_and_text_encoder(tmp_path):
    tensors = _kohya_tensors()
    write_safetensors(tmp_path / "k.safetensors", tensors, {"ss_network_alpha": "1"},
                      bf16=tuple(k for k in tensors if "conv1" in k))  # fmt: skip
    lora = read_lora(tmp_path / "k.safetensors")
    assert lora.format == "kohya" and lora.components == {"unet", "text_encoder"}
    q = lora.modules["unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert q.rank == 4 and q.scale == 2.0  # its own alpha 8 / rank 4
    down, up = tensors[next(k for k in tensors if k.endswith("to_q.lora_down.weight"))], q.up
    np.testing.assert_allclose(q.delta(), up @ down, rtol=1e-6)
    conv = lora.modules["unet", "down_blocks_0_resnets_0_conv1"]
    assert conv.scale == 1 / 4  # no alpha tensor: the metadata's ss_network_alpha (1)
    expected = (conv.up.reshape(5, 4) @ conv.down.reshape(4, -1)).reshape(5, 3, 3, 3)
    np.testing.assert_allclose(conv.delta(), expected, rtol=1e-6)
    assert lora.modules["text_encoder", "text_model_encoder_layers_0_self_attn_q_proj"].scale == 0.5


def test_kohya_sdxl_text_encoders_and_default_alpha(tmp_path):
    down, up = np.ones((2, 4), np.float32), np.ones((3, 2), np.float32)
    write_safetensors(tmp_path / "xl.safetensors", {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
    })  # fmt: skip
    lora = read_lora(tmp_path / "xl.safetensors")
    assert lora.components == {"text_encoder", "text_encoder_2"}
    assert all(m.scale == 1.0 for m in lora.modules.values())  # no alpha anywhere: alpha = rank


def test_locon_tucker_mid(tmp_path):
    r = 3
    down = RNG.standard_normal((r, 4, 1, 1)).astype(np.float32)
    mid = RNG.standard_normal((r, r, 3, 3)).astype(np.float32)
    up = RNG.standard_normal((6, r, 1, 1)).astype(np.float32)
    base = "lora_unet_down_blocks_0_resnets_0_conv2"
    write_safetensors(tmp_path / "t.safetensors", {f"{base}.lora_down.weight": down, f"{base}.lora_mid.weight": mid,
                                                   f"{base}.lora_up.weight": up})  # fmt: skip
    m = read_lora(tmp_path / "t.safetensors").modules["unet", "down_blocks_0_resnets_0_conv2"]
    expected = np.zeros((6, 4, 3, 3), np.float64)
    for o in range(6):
        for i in range(4):
            for a in range(r):
                for b in range(r):
                    expected[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    np.testing.assert_allclose(m.delta(), expected, rtol=1e-5, atol=1e-5)


def test_diffusers_format_with_peft_metadata_and_patterns(tmp_path):
    down, up = RNG.standard_normal((4, 8)).astype(np.float32), RNG.standard_normal((6, 4)).astype(np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {},
                                                 "unet.alpha_pattern": {"attn1.to_k": 2},
                                                 "text_encoder.r": 4, "text_encoder.lora_alpha": 4})}  # fmt: skip
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", {
        f"unet.{mod}.to_q.lora_A.weight": down, f"unet.{mod}.to_q.lora_B.weight": up,
        f"unet.{mod}.to_k.lora_A.weight": down, f"unet.{mod}.to_k.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
    }, meta)  # fmt: skip
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "diffusers"
    assert lora.modules["unet", f"{mod}.to_q"].scale == 2.0
    assert lora.modules["unet", f"{mod}.to_k"].scale == 0.5  # alpha_pattern
    assert lora.modules["text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0


def test_peft_own_save_and_legacy_processor_names(tmp_path):
    down, up = np.ones((2, 4), np.float32), np.ones((3, 2), np.float32)
    folder = tmp_path / "peft"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors", {
        "base_model.model.mid_block.attentions.0.proj_in.lora_A.weight": down,
        "base_model.model.mid_block.attentions.0.proj_in.lora_B.weight": up,
    })  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 1}))
    peft = read_lora(folder / "adapter_model.safetensors")
    assert peft.modules["unet", "mid_block.attentions.0.proj_in"].scale == 0.5
    write_safetensors(tmp_path / "legacy.safetensors", {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": up,
    })  # fmt: skip
    legacy = read_lora(tmp_path / "legacy.safetensors")
    assert ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") in legacy.modules


@pytest.mark.parametrize(
    "key,kind",
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("unet.x.lora_magnitude_vector.weight", "DoRA"),
        ("lora_unet_x.diff", "full-difference"),
    ],
)
def test_unsupported_kinds_are_named(tmp_path, key, kind):
    write_safetensors(tmp_path / "l.safetensors", {key: np.ones((2, 2), np.float32)})
    with pytest.raises(LoraFileError, match=kind):
        read_lora(tmp_path / "l.safetensors")


@pytest.mark.parametrize(
    "tensors,needle",
    [
        ({"lora_unet_x.lora_down.weight": np.ones((4, 8), np.float32),
          "lora_unet_x.lora_up.weight": np.ones((6, 3), np.float32)},
         "rank mismatch: down .A. has rank 4, up .B. takes 3"),
        ({"lora_unet_x.lora_down.weight": np.ones((4, 8), np.float32)}, "has no up .B. factor"),
        ({"lora_unet_x.lora_down.weight": np.ones((2, 8), np.float32),
          "lora_unet_x.lora_up.weight": np.ones((6, 2), np.float32), "lora_unet_x.alpha": np.float32(np.inf)},
         "alpha is inf"),
        ({"lora_unet_x.lora_down.weight": np.full((2, 8), np.nan, np.float32),
          "lora_unet_x.lora_up.weight": np.ones((6, 2), np.float32)}, "NaN or infinite"),
        ({"something.else": np.ones((2, 2), np.float32)}, "no LoRA tensors found"),
    ],
)  # fmt: skip
def test_bad_factors_are_refused_naming_the_module(tmp_path, tensors, needle):
    write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LoraFileError, match=needle):
        read_lora(tmp_path / "bad.safetensors")
