"""GR00T N1.5's text tokenizer (Qwen2-style byte-level BPE), built with the `tokenizers` library.

Real tokenizer: a local directory with vocab.json + merges.txt + the added tokens (added_tokens.json,
or tokenizer_config.json's added_tokens_decoder). It is assembled the way the checked recipe says
(../shared/groot_n15_tokenizer/README.md): BPE from vocab + merges, NFC, Qwen2's split regex, byte-
level pre-tokenizer without prefix space, added tokens registered as special tokens in id order.
Every id the prompt relies on is then checked, because a wrong assembly silently shifts them.

Built-in tokenizer (tiny preset only, when no tokenizer_dir is given): the same pipeline with a
vocabulary of just the 256 byte tokens, at the ids the real vocabulary gives them (Qwen's vocabulary
starts with the byte alphabet in GPT-2's bytes_to_unicode order), no merges, and the prompt's special
tokens at their real ids. It shares no data with the real files. Every id it emits is a real id, the
special-token layout of the prompt is identical, but text is spelled byte by byte, so text runs are
longer (e.g. "<image 1>" is 9 tokens instead of 5). That is fine for a random-weight test teacher;
features meant to be compared with GR00T need the real tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from sage.errors import TeacherError
from sage.teacher.settings import TOKENIZER_HELP

# The ids the prompt uses (GROOT_N15.md, facts); both tokenizers must produce exactly these.
SPECIAL_IDS: dict[str, int] = {
    "<|endoftext|>": 151643,  # also the pad token
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<IMG_CONTEXT>": 151669,
    "<img>": 151670,
    "</img>": 151671,
}
PAD_ID = SPECIAL_IDS["<|endoftext|>"]
IMG_CONTEXT_ID = SPECIAL_IDS["<IMG_CONTEXT>"]

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2/Qwen3 and Eagle 2.5).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BUILTIN_ID = "builtin-bytes/1"


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode characters in their construction order: printable bytes first.

    Qwen's vocabulary gives these 256 characters the ids 0..255 in exactly this order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class GrootTokenizer:
    """Text -> ids (special tokens written in the text are recognised), plus an identity for caches."""

    def __init__(self, tokenizer: object, identity: str, source: str) -> None:
        self._tok = tokenizer
        self.identity = identity  # "builtin-bytes/1" or a content hash of the real files
        self.source = source  # where it came from, for messages and manifests
        self._check_special_ids()

    @property
    def is_builtin(self) -> bool:
        return self.identity == BUILTIN_ID

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _check_special_ids(self) -> None:
        for token, expected in SPECIAL_IDS.items():
            got = self._tok.token_to_id(token)
            encoded = self.encode(token)
            if got != expected or encoded != [expected]:
                raise TeacherError(
                    f"tokenizer from {self.source}: {token} must be id {expected}, got {got} "
                    f"(encodes to {encoded[:4]}). This is not GR00T N1.5's tokenizer (Qwen3's own lacks "
                    f"<IMG_CONTEXT>).\n{TOKENIZER_HELP}"
                )


def _assemble(vocab: dict[str, int], merges: list[tuple[str, str]], added: list[tuple[int, str]]) -> object:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # In id order: the library hands out the next free id to a token the vocabulary lacks.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(added)])
    return tok


def builtin_tokenizer() -> GrootTokenizer:
    """The tiny preset's offline tokenizer (module docstring)."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    vocab.update(SPECIAL_IDS)  # present in the model vocab, so add_special_tokens keeps these ids
    added = [(i, t) for t, i in SPECIAL_IDS.items()]
    return GrootTokenizer(_assemble(vocab, [], added), BUILTIN_ID, "the built-in byte-level tokenizer")


def _read_added_tokens(directory: Path) -> list[tuple[int, str]]:
    added_file, config_file = directory / "added_tokens.json", directory / "tokenizer_config.json"
    if added_file.is_file():
        raw = json.loads(added_file.read_text())
        return [(int(i), t) for t, i in raw.items()]
    if config_file.is_file():
        decoder = json.loads(config_file.read_text()).get("added_tokens_decoder", {})
        if decoder:
            return [(int(i), entry["content"]) for i, entry in decoder.items()]
    raise TeacherError(
        f"{directory}: no added tokens found (expected added_tokens.json, or tokenizer_config.json with "
        f"added_tokens_decoder).\n{TOKENIZER_HELP}"
    )


def load_tokenizer(directory: str | Path | None, allow_builtin: bool) -> GrootTokenizer:
    """The real tokenizer from `directory`, or the built-in one when directory is None and allowed."""
    if directory is None:
        if allow_builtin:
            return builtin_tokenizer()
        raise TeacherError(
            f"teacher.tokenizer_dir is not set: the real GR00T N1.5 teacher needs its tokenizer.\n{TOKENIZER_HELP}"
        )
    directory = Path(directory).expanduser()
    missing = [n for n in ("vocab.json", "merges.txt") if not (directory / n).is_file()]
    if missing:
        where = f"{directory} has no {' or '.join(missing)}" if directory.is_dir() else f"{directory} does not exist"
        raise TeacherError(f"teacher.tokenizer_dir: {where}.\n{TOKENIZER_HELP}")
    vocab_bytes = (directory / "vocab.json").read_bytes()
    merges_text = (directory / "merges.txt").read_text(encoding="utf-8")
    try:
        vocab = json.loads(vocab_bytes)
    except json.JSONDecodeError as e:
        raise TeacherError(f"{directory / 'vocab.json'}: not valid JSON ({e.msg})") from None
    merges = []
    for n, line in enumerate(merges_text.splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TeacherError(f"{directory / 'merges.txt'}, line {n}: expected two tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    added = _read_added_tokens(directory)
    h = hashlib.sha256(vocab_bytes)
    h.update(merges_text.encode())
    h.update(json.dumps(sorted(added)).encode())
    return GrootTokenizer(_assemble(vocab, merges, added), "sha256:" + h.hexdigest()[:16], str(directory))
