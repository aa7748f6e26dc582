"""The teacher-feature cache: manifest + safetensors shards, written resumably, read memory-mapped.

One directory per (teacher, view, dataset):

    <teacher.cache_dir>/<preset>/<view>/<dataset>[+tokens]/
        manifest.json     spec (what produced the features) + one location per entry, once complete
        shards/part-K-of-N-SEQ.safetensors
                          tensors "<key>/pooled" [n_grids, dim] (and "<key>/tokens" [n_tokens, dim]
                          when token features were asked for); the header metadata repeats the spec
                          hash and each entry's example and roles, so shards describe themselves

An entry is one teacher prompt, made for one student example: the demonstrations it shows the
student, in its order, then its query input (sage/teacher/prompt.py); its key names them, e.g.
"a85d4709/q4/d0.1.2", and the manifest records task, query and demonstrations. Its pooled features
are the mean of the teacher's output over each image's 256 <IMG_CONTEXT> tokens, one row per grid
in prompt order; `roles` says which grid each row is (e.g. train/0/input). A cache holds the prompts
of every configuration it was extracted for; a reader asks for the keys it needs
(`FeatureCache.missing`), and a missing one is extracted (sage/distill.py) or named in an error.

Resumption: a shard is written to a temporary name, fsynced and renamed, so a shard either exists
whole or not at all. On (re)start the shards are scanned and every entry already present is skipped;
an interrupted run loses at most the shard it was filling. `--shard k/n` processes task k, k+n, ...
into its own shard names, so n processes can share the directory; whoever finds every entry present
(or `--merge`) writes the manifest, listing every entry the shards hold. An entry present in two
shards (possible only when runs with different n overlapped) is recorded once.

The spec's `identity` (teacher, weights, tokenizer, view, prompt, rendering, feature dim/dtype,
dataset content) must equal what the config asks for, or the cache is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from sage.arc import Task
from sage.errors import FeatureCacheError
from sage.files import FileKind, atomic_write, first_line, read_json, require_keys
from sage.teacher.loading import checkpoint_fingerprint, read_safetensors_header
from sage.teacher.presets import ORACLE_FEATURE_DIM, ORACLE_PRESET, get_preset, oracle_identity, require_real_files
from sage.teacher.prompt import EntryFeatures, Role, instruction_for, prompt_template, role_of
from sage.teacher.render import IMAGE_SIZE, RENDER_ID
from sage.teacher.settings import LEAKING_VIEWS, TeacherConfig
from sage.teacher.tokenizer import load_tokenizer

FORMAT = "sage-feature-cache/2"
# Format 1 had one prompt per test input, which showed a training example whose query is a
# demonstration its own answer. Such caches are refused with this message.
OLD_FORMAT_HELP = ("it was written by an older SAGE whose prompts showed training examples their own answers; "
                   "delete the directory and extract again")
MANIFEST = "manifest.json"
SHARDS = "shards"
POOLING = "mean over each image's <IMG_CONTEXT> output tokens (final normed hidden state of the 12-layer Qwen3)"
ONE_PROMPT_PER = "student example (its demonstrations in the student's order, then its query input)"
SHARD_BYTES = 512 * 2**20  # also flush a shard once its tensors reach this size (token features)
_SHARD_RE = re.compile(r"^part-(\d+)-of-(\d+)-(\d+)\.safetensors$")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Damage to either costs no recomputation beyond the damaged shard: shards describe themselves, and an
# extraction without a manifest rescans them and extracts only the prompts they lack.
MANIFEST_FILE = FileKind("the feature cache's manifest", FeatureCacheError,
                         "delete this manifest.json and rerun (training, or extract_groot_features.py with the "
                         "run's config): the shards are kept and rescanned, only prompts they lack are extracted")
SHARD_FILE = FileKind("this feature-cache shard", FeatureCacheError,
                      "it is truncated or corrupted: delete it and the cache's manifest.json, then rerun (training, "
                      "or extract_groot_features.py with the run's config): the other shards are kept, only this "
                      "shard's prompts are extracted again")


# ----------------------------------------------------------------------------- identity


def dataset_slug(dataset: str, tasks: Sequence[Task]) -> str:
    """A directory name for a dataset: official names as is, directories by name + path hash,
    generated tasks by content (other data.synthetic options, another cache)."""
    if "/" in dataset and not Path(dataset).expanduser().exists():  # arc-agi-1/training etc.
        return dataset.replace("/", "_")
    if dataset == "synthetic":
        return f"{dataset}-{dataset_identity(dataset, tasks)['fingerprint'][:8]}"
    path = Path(dataset).expanduser().resolve()
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def cache_path(teacher: TeacherConfig, dataset: str, tasks: Sequence[Task], limit: int | None = None) -> Path:
    name = (dataset_slug(dataset, tasks) + (f"-first{limit}" if limit else "")
            + ("+tokens" if teacher.token_features else ""))
    return Path(teacher.cache_dir).expanduser() / teacher.preset / teacher.view / name


def dataset_identity(dataset: str, tasks: Sequence[Task]) -> dict[str, Any]:
    h = hashlib.sha1()
    for t in tasks:
        h.update(t.id.encode())
        h.update(t.fingerprint().encode())
        for pair in t.test:  # the with_answer view shows test outputs; Task.fingerprint covers inputs only
            if pair.output is not None:
                h.update(pair.output.tobytes())
    return {
        "name": dataset,
        "fingerprint": h.hexdigest()[:16],
        "num_tasks": len(tasks),
        "num_entries": sum(len(t.test) for t in tasks),
    }


def teacher_identity(teacher: TeacherConfig) -> dict[str, Any]:
    """What determines the teacher's function: architecture, weights, tokenizer. Cheap: reads the
    tokenizer and a few MB of the checkpoint, builds no model."""
    if teacher.preset == ORACLE_PRESET:
        return oracle_identity(teacher.seed, teacher.noise)
    arch = get_preset(teacher.preset)
    require_real_files(teacher)
    if teacher.checkpoint_dir is None:
        weights = f"random(seed={teacher.seed})"
    else:
        weights = checkpoint_fingerprint(teacher.checkpoint_dir)
    tokenizer = load_tokenizer(teacher.tokenizer_dir, allow_builtin=not arch.has_public_weights)
    return {"preset": arch.name, "arch": arch.to_dict(), "weights": weights, "tokenizer": tokenizer.identity}


def build_spec(teacher: TeacherConfig, dataset: str, tasks: Sequence[Task]) -> dict[str, Any]:
    """The cache's spec: `identity` must match to reuse a cache; `info` is recorded only."""
    identity: dict[str, Any] = {
        "format": FORMAT,
        "teacher": teacher_identity(teacher),
        "view": teacher.view,
        "leaks_answer": teacher.view in LEAKING_VIEWS,
        "prompt": {"max_demos": teacher.max_demos, "one_prompt_per": ONE_PROMPT_PER},
        "features": {"dtype": teacher.feature_dtype},
        "dataset": dataset_identity(dataset, tasks),
    }
    if teacher.preset == ORACLE_PRESET:  # no images, no text: the grids' roles and the task's rule
        identity["features"].update(dim=ORACLE_FEATURE_DIM, pooling="one rule feature per grid", token_features=False)
    else:
        arch = get_preset(teacher.preset)
        instruction = instruction_for(teacher.view)
        identity["prompt"].update(template=prompt_template(instruction, arch.tokens_per_image),
                                  instruction=instruction, tokens_per_image=arch.tokens_per_image)
        identity["image"] = {"size": IMAGE_SIZE, "render": RENDER_ID, "normalise": "(x / 255 - 0.5) / 0.5"}
        identity["features"].update(dim=arch.feature_dim, pooling=POOLING, token_features=teacher.token_features)
    return {"identity": identity, "info": {}}


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec["identity"], sort_keys=True).encode()).hexdigest()[:16]


def _differences(have: Any, want: Any, path: str = "") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want)):
            out += _differences(have.get(k), want.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if have == want else [f"{path}: cache has {_short(have)}, config asks for {_short(want)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_spec(directory: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    diffs = _differences(have["identity"], want["identity"])
    if diffs:
        raise FeatureCacheError(
            f"{directory}: this feature cache was made for something else, refusing to use it:\n  "
            + "\n  ".join(diffs[:8])
            + "\nPoint teacher.cache_dir elsewhere, or delete the directory and extract again."
        )


# ----------------------------------------------------------------------------- writing


def read_manifest(manifest: Path) -> dict[str, Any]:
    """A cache's manifest.json, checked: a damaged one raises FeatureCacheError naming it."""
    record = read_json(manifest, MANIFEST_FILE, keys=("format",))
    if record["format"] != FORMAT:
        why = OLD_FORMAT_HELP if record["format"] == "sage-feature-cache/1" else "delete it and extract again"
        raise FeatureCacheError(f"{manifest}: cache format {record['format']!r}, expected {FORMAT!r}: {why}")
    require_keys(record, ("complete", "spec", "entries"), manifest, MANIFEST_FILE)
    return record


def prepare_directory(directory: Path, spec: dict[str, Any]) -> None:
    """Create the cache directory for `spec`, or check that an existing one was made for it."""
    manifest = directory / MANIFEST
    if manifest.is_file():
        existing = read_manifest(manifest)
        check_spec(directory, existing["spec"], spec)
        (directory / SHARDS).mkdir(exist_ok=True)
        return
    (directory / SHARDS).mkdir(parents=True, exist_ok=True)
    # Several `--shard k/n` workers may get here together; they all write the same content.
    record = {"format": FORMAT, "complete": False, "spec": spec, "spec_hash": spec_hash(spec), "entries": {}}
    atomic_write(manifest, json.dumps(record, indent=1))


@dataclass
class ShardEntry:
    shard: str  # path relative to the cache directory
    task: str
    query: int  # the example's query pair, over task.train + task.test
    demos: list[int]  # the demonstrations the prompt shows, in order
    roles: list[str]
    n_tokens: int
    image_starts: list[int]

    @classmethod
    def from_meta(cls, shard: str, meta: dict[str, Any]) -> "ShardEntry":
        return cls(shard, meta["task"], meta["query"], meta["demos"], meta["roles"], meta["n_tokens"],
                   meta["image_starts"])


def scan_shards(directory: Path, expected_hash: str) -> tuple[dict[str, ShardEntry], int]:
    """Every entry stored in the finished shards (first occurrence wins) and the number of duplicates."""
    entries: dict[str, ShardEntry] = {}
    duplicates = 0
    shard_dir = directory / SHARDS
    for path in sorted(shard_dir.glob("part-*.safetensors")) if shard_dir.is_dir() else []:
        try:
            meta = read_safetensors_header(path).get("__metadata__", {})
        except Exception:  # TeacherError, OSError: a damaged shard, named with how to recover
            raise SHARD_FILE.damaged(path, "its safetensors header cannot be read") from None
        if meta.get("spec_hash") != expected_hash:
            raise FeatureCacheError(
                f"{path}: written for another spec (hash {meta.get('spec_hash')}, expected {expected_hash}); "
                "this shard does not belong in this cache, delete it"
            )
        try:
            stored = json.loads(meta["entries"])
        except (KeyError, ValueError):
            raise SHARD_FILE.damaged(path, "its header's list of entries cannot be read") from None
        for e in stored:
            if e["key"] in entries:
                duplicates += 1
                continue
            entries[e["key"]] = ShardEntry.from_meta(f"{SHARDS}/{path.name}", e)
    return entries, duplicates


class CacheWriter:
    """Accumulates entries and writes them as atomic safetensors shards of part k of n."""

    def __init__(self, directory: Path, spec: dict[str, Any], part: int = 0, parts: int = 1, shard_entries: int = 256):
        self.directory, self.spec = directory, spec
        self.hash = spec_hash(spec)
        self.part, self.parts, self.shard_entries = part, parts, shard_entries
        self.dtype = _DTYPES[spec["identity"]["features"]["dtype"]]
        prepare_directory(directory, spec)
        for stale in (directory / SHARDS).glob(f".part-{part:03d}-of-{parts:03d}-*.tmp"):
            stale.unlink()  # left by a killed run of this same part
        self.done, self.duplicates = scan_shards(directory, self.hash)
        seqs = [
            int(m.group(3))
            for p in (directory / SHARDS).iterdir()
            if (m := _SHARD_RE.match(p.name)) and (int(m.group(1)), int(m.group(2))) == (part, parts)
        ]
        self.next_seq = max(seqs, default=-1) + 1
        self._tensors: dict[str, torch.Tensor] = {}
        self._meta: list[dict[str, Any]] = []
        self._bytes = 0
        self.shards_written: list[Path] = []

    def add(self, entry: EntryFeatures) -> None:
        if entry.key in self.done or any(m["key"] == entry.key for m in self._meta):
            raise FeatureCacheError(f"{self.directory}: entry {entry.key} is already stored")
        pooled = entry.pooled.detach().to("cpu", torch.float32)
        if not torch.isfinite(pooled).all():
            raise FeatureCacheError(f"task {entry.task_id}, prompt {entry.key}: the teacher produced non-finite features")
        stored = pooled.to(self.dtype)
        if not torch.isfinite(stored).all():
            raise FeatureCacheError(
                f"task {entry.task_id}: features overflow {self.dtype} (max |x| = {pooled.abs().max():.3g}); "
                "set teacher.feature_dtype=bfloat16"
            )
        self._tensors[f"{entry.key}/pooled"] = stored.contiguous()
        self._bytes += stored.numel() * stored.element_size()
        if entry.tokens is not None:
            tokens = entry.tokens.detach().to("cpu").to(self.dtype).contiguous()
            self._tensors[f"{entry.key}/tokens"] = tokens
            self._bytes += tokens.numel() * tokens.element_size()
        self._meta.append(
            {
                "key": entry.key,
                "task": entry.task_id,
                "query": entry.query,
                "demos": list(entry.demos),
                "roles": [str(r) for r in entry.roles],
                "n_tokens": entry.n_tokens,
                "image_starts": list(entry.image_starts),
            }
        )
        if len(self._meta) >= self.shard_entries or self._bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> Path | None:
        """Write what has accumulated as one shard (atomically); returns its path."""
        from safetensors.torch import save_file

        if not self._meta:
            return None
        name = f"part-{self.part:03d}-of-{self.parts:03d}-{self.next_seq:05d}.safetensors"
        final = self.directory / SHARDS / name
        tmp = self.directory / SHARDS / f".{name[:-len('.safetensors')]}.tmp"
        metadata = {"format": FORMAT, "spec_hash": self.hash, "entries": json.dumps(self._meta)}
        save_file(self._tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for m in self._meta:
            self.done[m["key"]] = ShardEntry.from_meta(f"{SHARDS}/{name}", m)
        self.next_seq += 1
        self._tensors, self._meta, self._bytes = {}, [], 0
        self.shards_written.append(final)
        return final


def finalize(
    directory: Path, spec: dict[str, Any], expected_keys: Iterable[str], info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the manifest (every entry the shards hold, also those of earlier extractions for other
    configurations) if every expected entry is stored. Returns a status dict:
    {"complete", "present", "expected", "missing" (a few keys), "duplicates"}."""
    entries, duplicates = scan_shards(directory, spec_hash(spec))
    expected = list(dict.fromkeys(expected_keys))
    missing = [k for k in expected if k not in entries]
    status = {"complete": not missing, "present": len(expected) - len(missing), "expected": len(expected),
              "missing": missing[:5], "duplicates": duplicates}
    if missing:
        return status
    shard_bytes = {p.name: p.stat().st_size for p in (directory / SHARDS).glob("part-*.safetensors")}
    previous = read_manifest(directory / MANIFEST) if (directory / MANIFEST).is_file() else {}
    info = {**previous.get("spec", {}).get("info", {}), **spec.get("info", {}), **(info or {})}
    record = {
        "format": FORMAT,
        "complete": True,
        "spec": {"identity": spec["identity"], "info": info},
        "spec_hash": spec_hash(spec),
        "stats": {"entries": len(entries), "shards": len(shard_bytes), "bytes": sum(shard_bytes.values())},
        "entries": {k: asdict(e) for k, e in sorted(entries.items())},
    }
    atomic_write(directory / MANIFEST, json.dumps(record, indent=1))
    return status


# ----------------------------------------------------------------------------- reading


class FeatureCache:
    """Read side, used by training and evaluation. Tensors come out of memory-mapped shards
    (safetensors.safe_open); handles are opened lazily per process, so DataLoader workers are fine."""

    def __init__(self, directory: str | Path, expected_spec: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise FeatureCacheError(
                f"{self.directory}: no feature cache here (no {MANIFEST}). Run "
                "`python extract_groot_features.py --config <your config>` first."
            )
        record = read_manifest(manifest)
        self.spec: dict[str, Any] = record["spec"]
        if expected_spec is not None:
            check_spec(self.directory, self.spec, expected_spec)
        if not record.get("complete"):
            raise FeatureCacheError(
                f"{self.directory}: the cache is incomplete (extraction was interrupted or other --shard parts are "
                "still running). Rerun the same extraction command to finish it, or run with --merge once all "
                "parts are done."
            )
        self.entries: dict[str, dict[str, Any]] = record["entries"]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        for shard in sorted({e["shard"] for e in self.entries.values()}):  # a damaged file fails now, by name
            self._open(shard)

    # -- what it holds
    @property
    def identity(self) -> dict[str, Any]:
        return self.spec["identity"]

    @property
    def leaks_answer(self) -> bool:
        """True for the with_answer view: features computed with the test output visible."""
        return bool(self.identity["leaks_answer"])

    @property
    def dim(self) -> int:
        return int(self.identity["features"]["dim"])

    @property
    def has_tokens(self) -> bool:
        return bool(self.identity["features"]["token_features"])

    def keys(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (sage.teacher.prompt.example_key) of `keys` that the cache does not hold."""
        return [k for k in dict.fromkeys(keys) if k not in self.entries]

    def roles(self, key: str) -> tuple[Role, ...]:
        return tuple(Role.parse(r) for r in self._entry(key)["roles"])

    # -- tensors
    def pooled(self, key: str) -> torch.Tensor:
        """[n_grids, dim] in the stored dtype, one row per grid in prompt order (see `roles`)."""
        return self._tensor(key, "pooled")

    def lookup(self, key: str, roles: Sequence[Role]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the grids `roles` (e.g. a student example's grids in slot order) from prompt
        `key`: ([len(roles), dim], bool mask of the roles the prompt showed). Rows of grids the
        teacher did not see (beyond teacher.max_demos) are zero, mask False."""
        return self._select(key, roles, self.pooled(key))

    def lookup_tokens(self, key: str, roles: Sequence[Role], side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `lookup`, with each grid's image tokens average-pooled over the image's patch grid to
        side x side: ([len(roles), side * side, dim] float32, mask). Needs token_features."""
        images = self.image_tokens(key)  # [n_grids, patches, dim]
        n, patches, dim = images.shape
        grid = math.isqrt(patches)
        if grid * grid != patches or not 1 <= side <= grid:
            raise FeatureCacheError(f"{self.directory}: cannot pool {patches} image tokens to {side}x{side}")
        pooled = F.adaptive_avg_pool2d(images.float().reshape(n, grid, grid, dim).permute(0, 3, 1, 2), side)
        pooled = pooled.flatten(2).transpose(1, 2)  # [n_grids, side*side, dim], row-major patches
        return self._select(key, roles, pooled)

    def _select(self, key: str, roles: Sequence[Role], per_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `per_grid` (one per grid of the prompt) in the order of `roles`; zero and mask
        False for grids the prompt did not show."""
        row = {r: i for i, r in enumerate(self.roles(key))}
        out = per_grid.new_zeros((len(roles), *per_grid.shape[1:]))
        mask = torch.zeros(len(roles), dtype=torch.bool)
        for i, r in enumerate(roles):
            if r in row:
                out[i], mask[i] = per_grid[row[r]], True
        return out, mask

    def tokens(self, key: str) -> torch.Tensor:
        """[n_tokens, dim]: every output token of the (unpadded) prompt. Needs token_features."""
        if not self.has_tokens:
            raise FeatureCacheError(
                f"{self.directory}: token features were not extracted; extract with teacher.token_features=true"
            )
        return self._tensor(key, "tokens")

    def image_tokens(self, key: str) -> torch.Tensor:
        """[n_grids, tokens_per_image, dim]: the output tokens at each image's <IMG_CONTEXT> positions."""
        tokens = self.tokens(key)
        per_image = int(self.identity["prompt"]["tokens_per_image"])
        starts = self._entry(key)["image_starts"]
        return torch.stack([tokens[s : s + per_image] for s in starts])

    def _entry(self, key: str) -> dict[str, Any]:
        if key not in self.entries:
            raise FeatureCacheError(
                f"{self.directory}: no teacher features for prompt {key} (task/query pair/demonstrations); the cache "
                "was extracted for another configuration: run `python extract_groot_features.py --config <your config>`"
            )
        return self.entries[key]

    def _tensor(self, key: str, what: str) -> torch.Tensor:
        shard = self._entry(key)["shard"]
        name = f"{key}/{what}"
        try:
            return self._open(shard).get_tensor(name)
        except SafetensorError as e:
            raise SHARD_FILE.damaged(self.directory / shard, f"no readable {name} ({first_line(e)})") from None

    def _open(self, shard: str) -> Any:
        """The shard's safetensors handle (memory-mapped; reading the header checks that the file is whole)."""
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked (DataLoader worker): mmaps are per process
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            path = self.directory / shard
            if not path.is_file():
                raise FeatureCacheError(f"{path}: shard listed in the manifest is missing; delete the cache's "
                                        f"{MANIFEST} and rerun: only the prompts missing from the shards are extracted")
            try:
                handle = self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise SHARD_FILE.damaged(path, first_line(e)) from None
        return handle


def example_roles(demos: Sequence[int], query: int, n_train: int) -> list[Role]:
    """Roles of a student example's context grids in slot order (demo k input, demo k output, ...,
    query input), from sage.encoding's indices over task.train + task.test."""
    sides = [role_of(d, side, n_train) for d in demos for side in ("input", "output")]
    return sides + [role_of(query, "input", n_train)]


def open_cache(
    teacher: TeacherConfig, dataset: str, tasks: Sequence[Task], limit: int | None = None, allow_leaking: bool = True
) -> FeatureCache:
    """The cache the config asks for, checked against it (teacher, weights, view, prompt, dataset)."""
    directory = cache_path(teacher, dataset, tasks, limit)
    cache = FeatureCache(directory, expected_spec=build_spec(teacher, dataset, tasks))
    if cache.leaks_answer and not allow_leaking:
        raise FeatureCacheError(f"{directory}: the {teacher.view} view shows the teacher the answer; refused here")
    return cache

