#!/usr/bin/env python3
"""Writes the first N decoder layers of a llama-architecture GGUF as a GGUF of
its own: every metadata key as it is except `<arch>.block_count`, every
tensor except `blk.<i>.*` for i >= N, tensor data copied byte for byte;
with --embedding-type, the token embedding requantized (e.g. Q8_0 -> Q4_1).

Why: the GPU machine is reached through a 64 MiB transfer, and the real
SmolLM2-135M GGUF is 94 MiB (it does not compress). Its first layers are
still a real model (real weights, tokenizer, chat template), which is what
the CPU-vs-CUDA check of server-mini/tests/cuda_backend.rs needs.

    python3 scripts/cut_gguf.py IN.gguf OUT.gguf N [--embedding-type Q4_1]   (needs `pip install gguf`)

SmolLM2's Q8_0 embedding alone is 29 MiB; requantized to Q4_1 it is 17 MiB,
so 3 layers (2.1 MiB each) fit beside the staged test binaries. Both backends
of the check load the same file, so a requantized embedding is compared
like any other weight.
"""
import argparse

import gguf


EMBEDDING = "token_embd.weight"


def cut(src: str, dst: str, layers: int, embedding_type: "gguf.GGMLQuantizationType | None") -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.fields[count_key].contents()
    if not 1 <= layers <= total:
        raise SystemExit(f"{src} has {total} layers; cannot keep {layers}")
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)

    def kept(name: str) -> bool:
        parts = name.split(".")
        return not (parts[0] == "blk" and int(parts[1]) >= layers)

    def data(t):
        """(raw bytes as stored, their type) of a kept tensor."""
        if t.name == EMBEDDING and embedding_type is not None and t.tensor_type != embedding_type:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            return gguf.quants.quantize(values, embedding_type), embedding_type
        return t.data, t.tensor_type

    tensors = [(t.name, *data(t)) for t in reader.tensors if kept(t.name)]
    for name, raw, qtype in tensors:
        writer.add_tensor_info(name, raw.shape, raw.dtype, raw.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, raw, _ in tensors:
        writer.write_tensor_data(raw, tensor_endianess=reader.endianess)
    writer.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("layers", type=int)
    ap.add_argument("--embedding-type", choices=["Q4_0", "Q4_1", "Q8_0"])
    args = ap.parse_args()
    etype = gguf.GGMLQuantizationType[args.embedding_type] if args.embedding_type else None
    cut(args.src, args.dst, args.layers, etype)
