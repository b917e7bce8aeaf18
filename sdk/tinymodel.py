"""A tiny random-weight llama model in GGUF, for tests and the demo (about 0.5 MB, F32).

llama.cpp loads and serves it like any other llama model: a real tokenizer (byte fallback, so
any text tokenizes), a chat template, two transformer blocks. The weights are random, so the
text it writes is noise; ask for ``"ignore_eos": true`` to get an exact number of tokens.

numpy and gguf (the ``tinymodel`` extra) are imported inside the functions: the agent never
imports this module.

    python -m llm_ops_helper.tinymodel OUT.gguf [--seed N] [--variant TEXT] [--broken]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

N_VOCAB = 318
N_EMBD = 64
N_BLOCKS = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 256

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ("▁the", "▁and", "▁hello", "▁world", "▁model", "▁llm")
# A minimal jinja template that llama.cpp's template engine (minja) accepts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: SentencePiece-style with byte fallback."""
    normal, unknown, control, byte = 1, 2, 3, 6  # gguf.TokenType values
    tokens = ["<unk>", "<s>", "</s>"]
    types = [unknown, control, control]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [byte] * 256
    pieces = ["▁", *_LETTERS, *(f"▁{c}" for c in _LETTERS), *_WORDS]
    tokens += pieces
    types += [normal] * len(pieces)
    # Longer pieces score higher, so the tokenizer prefers "▁hello" over "▁h" "e" "l" ...
    scores = [0.0] * (3 + 256) + [-10.0 + len(p) for p in pieces]
    assert len(tokens) == N_VOCAB
    return tokens, scores, types


def _seed(seed: int, variant: str) -> int:
    if not variant:
        return seed
    return seed ^ int.from_bytes(hashlib.sha256(variant.encode()).digest()[:4], "little")


def write_tiny_llama(path: str | Path, *, seed: int = 0, variant: str = "") -> Path:
    """Write the tiny model to ``path``; another ``seed`` or ``variant`` gives other bytes."""
    import gguf
    import numpy as np

    path = Path(path)
    rng = np.random.default_rng(_seed(seed, variant))

    def weight(*shape: int) -> Any:
        # numpy shape is ggml's ne reversed: (rows, cols) = ne [cols, rows].
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama" + (f"-{variant}" if variant else ""))
    if variant:
        writer.add_description(f"variant {variant}")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_BLOCKS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(N_VOCAB)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    head_dim = N_EMBD // N_HEAD
    writer.add_tensor("token_embd.weight", weight(N_VOCAB, N_EMBD))
    writer.add_tensor("output_norm.weight", ones(N_EMBD))
    writer.add_tensor("output.weight", weight(N_VOCAB, N_EMBD))
    for i in range(N_BLOCKS):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_broken_gguf(path: str | Path) -> Path:
    """A GGUF file that llama.cpp refuses to load: the tiny model cut off mid-tensor-data.

    What a truncated download looks like: the header and metadata are valid (its format still
    reads as GGUF), the tensor data is not all there.
    """
    path = Path(path)
    write_tiny_llama(path, variant="broken")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_ops_helper.tinymodel",
                                     description="write a tiny random-weight llama GGUF")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="", help="any text: another version's bytes")
    parser.add_argument("--broken", action="store_true",
                        help="write a file llama.cpp refuses to load")
    args = parser.parse_args(argv)
    if args.broken:
        out = write_broken_gguf(args.out)
    else:
        out = write_tiny_llama(args.out, seed=args.seed, variant=args.variant)
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
