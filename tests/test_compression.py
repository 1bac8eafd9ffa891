"""Lossless compression with an integer flow (compression/, compress.py, decompress.py).

Code-length margin, asserted below: the ANS payload is at most the model's -log2 P(x)
plus 64 bits per file (constriction's AnsCoder flushes its 64-bit head and writes whole
32-bit words) plus 1e-3 bits per symbol (probabilities are quantized to 24 bits with
every symbol of the alphabet floored at 2^-24: about W * 2^-24 / ln 2 ~ 4e-5 bits per
symbol for W ~ 600 symbols).  It can be a little below -log2 P(x): the tails beyond a
latent's smallest and largest value in the file are folded into the edge bins.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from compression import bitstream
from compression.baselines import CODECS, available_codecs, codec_bits
from compression.codec import FlowCodec
from engine.config import load_config
from common.errors import FlowlabError
from engine.trainer import run_training
from models.architectures import build_model, idf
from tests.helpers import ROOT, SUBSET, run_command
from tests.test_idf import images, tiny_idf


def assert_code_length_margin(result, n_symbols: int):
    model = result.model_bits.sum()
    assert result.payload_bits <= model + 64 + 1e-3 * n_symbols, (result.payload_bits, model)
    assert result.payload_bits >= model - 0.01 * n_symbols, (result.payload_bits, model)


@pytest.fixture
def codec():
    return FlowCodec(tiny_idf(std=0.05), num_bits=8, chunk=8)


def test_encode_decode_is_byte_exact_on_random_images():
    model = tiny_idf(std=0.05)
    codec = FlowCodec(model, num_bits=8, chunk=8)
    x = images(20).numpy()  # two chunks and a partial one; images 0 and 1 are all 0 / all 255
    result = codec.encode(x)
    decoded = codec.decode(result.blob)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, x)
    assert_code_length_margin(result, x.size)
    header, _ = bitstream.unpack(result.blob)
    assert header.n_images == 20 and header.chunk == 8 and len(header.ranges) == 2
    # a fresh codec (as decompress.py builds one) with another chunk size decodes it too
    assert np.array_equal(FlowCodec(model, 8, chunk=3).decode(result.blob), x)


def test_real_cifar10_images_round_trip_after_some_training():
    with np.load(SUBSET) as f:
        train, test = f["x_train"][:16], f["x_test"][:12]
    train, test = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.shape[-1] == 3 else a for a in (train, test))
    cfg = {"name": "idf", **idf.DEFAULTS, "levels": 2, "steps": 1, "hidden_channels": 8, "hidden_blocks": 1}
    model = build_model(cfg, (3, 32, 32), 8)
    untrained_bpd = -model.log_prob(torch.from_numpy(test)).mean().item() / (test[0].size * np.log(2))
    opt = torch.optim.Adamax(model.parameters(), lr=5e-2)
    for _ in range(5):
        loss = -model.log_prob(torch.from_numpy(train)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    codec = FlowCodec(model, 8, chunk=5)
    result = codec.encode(test)
    assert np.array_equal(codec.decode(result.blob), test)
    assert_code_length_margin(result, test.size)
    # the file is the payload plus an 88-byte header; the payload's bits/dim is the model's
    model_bpd = result.model_bits.sum() / test.size
    assert result.coded_bits - result.payload_bits == 8 * (56 + 2 * 8 + 12 + 4)  # fixed part, 2 ranges, sizes + CRCs
    assert abs(result.payload_bits / test.size - model_bpd) < 0.01 and model_bpd < untrained_bpd - 0.3


def _repack_payload(blob: bytes, payload: bytes) -> bytes:
    """A blob whose payload is replaced and whose CRCs are recomputed (a corruption CRC misses)."""
    header, _ = bitstream.unpack(blob)
    return bitstream.pack(header, np.frombuffer(payload, dtype="<u4"))


def test_corrupt_truncated_or_mismatched_files_are_clear_errors(codec):
    x = images(6).numpy()
    blob = codec.encode(x).blob
    flipped = bytearray(blob)
    flipped[-7] ^= 0x10
    cases = {
        "payload checksum": bytes(flipped),
        "truncated or padded": blob[:-4],
        "shorter than the header": blob[:10],
        "header is incomplete": blob[:60],
        "not a flow-coded file": b"PNG!" + blob[4:],
        "header checksum": blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],
    }
    for message, bad in cases.items():
        with pytest.raises(FlowlabError, match=message):
            codec.decode(bad)
    other = FlowCodec(tiny_idf(std=0.05), 8)
    with pytest.raises(FlowlabError, match="different model"):
        other.decode(blob)
    # payload damage that passes the CRC (recomputed) is still caught: never a wrong image
    _, words = bitstream.unpack(blob)
    for i in range(0, words.size, max(1, words.size // 8)):
        damaged = words.copy()
        damaged[i] ^= np.uint32(0x00F00F00)
        with pytest.raises(FlowlabError):
            codec.decode(_repack_payload(blob, damaged.tobytes()))


def test_constant_image_with_an_untrained_model_round_trips():
    """Zero-initialised couplings leave a constant image constant: one-value alphabets."""
    model = build_model({"name": "idf", **idf.DEFAULTS, "levels": 2, "steps": 1, "hidden_channels": 4,
                         "hidden_blocks": 1}, (3, 8, 8), 8)
    codec = FlowCodec(model, 8)
    x = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    assert np.array_equal(codec.decode(codec.encode(x).blob), x)


def test_encoder_rejects_bad_input(codec):
    with pytest.raises(FlowlabError, match="shape"):
        codec.encode(np.zeros((2, 3, 4, 4), dtype=np.uint8))
    with pytest.raises(FlowlabError, match="uint8"):
        codec.encode(np.zeros((2, 3, 8, 8), dtype=np.int64))


def test_standard_codecs_are_lossless_and_measure_bits():
    assert set(available_codecs()) == set(CODECS)  # this build has all four
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    flat = np.full((2, 3, 32, 32), 77, dtype=np.uint8)
    for name in available_codecs():
        noisy_bits, flat_bits = codec_bits(name, noise), codec_bits(name, flat)
        assert noisy_bits / noise.size > 7.5 and flat_bits / flat.size < 2.0, name


def test_compress_and_decompress_commands(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "experiments", "idf_small.yaml"), [
        f"data.path={SUBSET}", "train.steps=2", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=2",
        "data.max_train=32", "data.max_test=8", "model.steps=1", "model.hidden_channels=8", "model.hidden_blocks=1"])
    run_training(cfg, str(run))  # in-process (as train.py does): one subprocess less
    out = tmp_path / "test.flic"
    res = run_command([sys.executable, "compress.py", str(run), "--split", "test", "--out", str(out), "--chunk", "4"])
    assert '"verified": true' in res.stdout and '"images": 8' in res.stdout
    run_command([sys.executable, "decompress.py", str(out), "--run", str(run), "--out", str(tmp_path / "dec")])
    with np.load(SUBSET) as f:
        expected = f["x_test"][:8]
    expected = expected.transpose(0, 3, 1, 2) if expected.shape[-1] == 3 else expected
    assert np.array_equal(np.load(tmp_path / "dec" / "images.npy"), expected)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / "00003.png")), expected[3].transpose(1, 2, 0))
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.flic").write_bytes(bytes(data))
    res = run_command([sys.executable, "decompress.py", str(tmp_path / "bad.flic"), "--run", str(run), "--out", str(tmp_path / "x")],
                      check=False)
    assert res.returncode == 2 and "error: corrupt file: payload checksum mismatch" in res.stderr
