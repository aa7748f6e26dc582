"""Files SAGE writes and reads back. Writing: the bytes go to a temporary file beside the target,
reach the disk, and only then replace the target in one rename, so a crash never leaves half of one.
Reading: a file damaged on disk (truncated, overwritten with other bytes, emptied) raises the
project's error for that kind of file, in one line that names the file, says what is wrong with it
and what to do; the damaged file is left as it is, for the user to look at."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # the type only: nothing here unpickles
from typing import Any, Sequence


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` by `data` (text is written as UTF-8): readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class FileKind:
    """A kind of file SAGE reads back: what it holds ("the checkpoint's metadata"), the error its
    damage raises (sage.errors: the scripts exit 2 on those) and what to do about it."""

    holds: str
    error: type[Exception]
    fix: str

    def damaged(self, path: str | Path, problem: str) -> Exception:
        """The error for `path`, which cannot be used because of `problem`."""
        return self.error(f"{path}: cannot read {self.holds}: {problem}; {self.fix}")


def first_line(error: BaseException, limit: int = 160) -> str:
    """A library's error message cut to its first sentence on one short line (some go on for lines
    of advice that does not fit a damaged file)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: str | Path, kind: FileKind) -> str:
    """The UTF-8 text of `path`; a missing, unreadable or non-text file raises `kind`'s error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise kind.damaged(path, "the file is missing") from None
    except UnicodeDecodeError as e:
        raise kind.damaged(path, f"corrupted, not text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise kind.damaged(path, f"the file cannot be opened ({e.strerror})") from None


def read_json(path: str | Path, kind: FileKind, keys: Sequence[str] | None = None) -> Any:
    """The JSON value in `path`; with `keys` (even none), an object holding them. A file that is
    missing, not text, not JSON (truncated, say) or not such an object raises `kind`'s error."""
    text = read_text(path, kind)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = "it is empty" if not text.strip() else f"line {e.lineno} column {e.colno}: {e.msg}"
        raise kind.damaged(path, f"truncated or corrupted, not valid JSON ({where})") from None
    require_keys(value, keys, path, kind)
    return value


def require_keys(value: Any, keys: Sequence[str] | None, path: str | Path, kind: FileKind) -> None:
    """Refuse `value`, read from `path`, unless it is a dict holding every one of `keys` (None: anything goes)."""
    if keys is None:
        return
    if not isinstance(value, dict):
        raise kind.damaged(path, f"corrupted, it holds a {type(value).__name__} where an object belongs")
    missing = [k for k in keys if k not in value]
    if missing:
        raise kind.damaged(path, f"incomplete or corrupted, it lacks {', '.join(repr(k) for k in missing)}")


def load_tensors(path: str | Path, kind: FileKind, keys: Sequence[str] | None = None) -> Any:
    """torch.load of `path` with weights_only=True (tensors and plain values: no pickled code runs);
    with `keys` (even none), a dict holding them. A missing or damaged file raises `kind`'s error."""
    import torch  # only the readers of torch files pay for the import

    if not Path(path).is_file():
        raise kind.damaged(path, "the file is missing")
    with warnings.catch_warnings(record=True) as noted:  # held back: a damaged file's error says enough
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except UnpicklingError:  # torch's advice (weights_only=False) would run whatever the bytes say
            raise kind.damaged(path, "corrupted, not a tensors-only torch file") from None
        except Exception as e:  # torch raises many types for a damaged file (RuntimeError, EOFError, ...)
            raise kind.damaged(path, f"truncated or corrupted ({first_line(e)})") from None
    for warning in noted:  # a whole file's, shown as usual
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    require_keys(value, keys, path, kind)
    return value
