"""A byte-level tokenizer built in code, so tiny models train offline with no tokenizer files.

Ids 0-255 are the byte values (any text encodes, nothing is unknown), 256-258 are ``<pad>``,
``<s>`` and ``</s>``: 259 ids, small enough for the tiny presets' 512-entry vocabularies. It
adds no special tokens by itself (`molf_ds.train.data.tokenize` appends ``</s>``), and decoding is
the exact inverse of encoding, so generated SQL compares byte for byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _byte_symbols() -> list[str]:
    """The printable character standing for each byte (GPT-2's byte-level convention).

    The ``tokenizers`` ByteLevel pre-tokenizer rewrites every byte as one printable character
    (printable Latin-1 bytes stand for themselves, the rest are shifted past U+0100), so the
    vocabulary must be keyed by those characters; index ``b`` holds the symbol of byte ``b``.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer (id = byte value, then ``<pad>``, ``<s>``, ``</s>``).

    A BPE model with the 256 byte symbols and no merges encodes one token per byte; built in
    code, it needs no download and is the same on every rank. ``save_pretrained`` writes a
    ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads back unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 16,
    )
