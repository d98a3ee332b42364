"""Loading models: the GGUF conversion's shared reader."""
import numpy as np
import pytest

from permsparse.models.smollm2 import one_gguf_reader

gguf = pytest.importorskip("gguf")


def test_one_gguf_reader_shares_one_parse_per_file_and_restores_the_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    opened = gguf.GGUFReader
    with one_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling: the same reader
        assert first.get_tensor(0).data.tolist() == np.arange(8).reshape(2, 4).tolist()
    assert gguf.GGUFReader is opened
    assert gguf.GGUFReader(path) is not first
