"""rillm's GGUF reader against gguf's own: every value type, every tensor type rillm keeps, and
damaged files failing with GGUFFormatError (never another exception, never a hang)."""

import gguf
import numpy as np
import pytest

from rillm.loader import default_model_path
from rillm.loader.gguf_file import GGUFFile, GGUFFormatError

Q = gguf.GGMLQuantizationType


def _write(path, alignment=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 250)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.125)
    writer.add_uint64("t.u64", 1 << 60)
    writer.add_int64("t.i64", -(1 << 60))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁ wörld")
    writer.add_string("t.empty", "")
    writer.add_array("t.strings", ["a", "", "ü" * 300, "<end_of_turn>"])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    writer.add_tensor("vec", rng.standard_normal(11).astype(np.float32))
    for qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        values = rng.standard_normal((4, 64)).astype(np.float32)
        blocks = gguf.quants.quantize(values, qtype)
        writer.add_tensor(f"q.{qtype.name}", blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]
    assert ours.keys() == keys
    for key in keys:
        if key == "t.nested":
            continue  # gguf's contents() flattens an array of arrays; checked below
        expected = theirs.fields[key].contents()
        assert ours.get(key) == pytest.approx(expected) if isinstance(expected, float) \
            else ours.get(key) == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in reference.shape), mine.name
        assert mine.tensor_type == reference.tensor_type, mine.name
        assert mine.data.dtype == reference.data.dtype, mine.name
        np.testing.assert_array_equal(mine.data, reference.data, err_msg=mine.name)
    return ours


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_reads_as_gguf_reads_it(tmp_path, alignment):
    ours = _assert_same(_write(tmp_path / "all.gguf", alignment))
    assert ours.get("t.strings") == ["a", "", "ü" * 300, "<end_of_turn>"]
    assert ours.get("t.nested") == [[1, 2], [3]]
    assert ours.get("t.absent", "default") == "default"
    assert "t.bools" in ours and "t.absent" not in ours


def test_the_default_model_reads_as_gguf_reads_it():
    ours = _assert_same(default_model_path())
    assert len(ours.get("tokenizer.ggml.tokens")) == 49152


def test_a_cut_anywhere_is_a_format_error(tmp_path):
    path = _write(tmp_path / "all.gguf")
    whole = path.read_bytes()
    last = GGUFFile(path).tensors[-1]
    data_end = last.offset + last.data.nbytes  # the writer may pad past it
    damaged = tmp_path / "cut.gguf"
    for cut in [*range(0, 64), *range(64, data_end, 7), data_end - 1]:
        damaged.write_bytes(whole[:cut])
        with pytest.raises(GGUFFormatError):
            GGUFFile(damaged)


def test_garbage_counts_and_magic_are_format_errors(tmp_path):
    whole = bytearray(_write(tmp_path / "all.gguf").read_bytes())
    damaged = tmp_path / "bad.gguf"
    for position, value in [(0, b"GGML"), (4, (99).to_bytes(4, "little")),
                            (8, (1 << 62).to_bytes(8, "little")),
                            (16, (1 << 62).to_bytes(8, "little"))]:
        data = bytearray(whole)
        data[position:position + len(value)] = value
        damaged.write_bytes(bytes(data))
        with pytest.raises(GGUFFormatError):
            GGUFFile(damaged)
