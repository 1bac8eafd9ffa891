"""Files of tensors and plain data that are read without running any code.

A file is one safetensors file: raw tensor bytes plus a JSON header.  ``write_tree`` stores a
nested tree of dicts, lists, tuples, numbers, strings, None and tensors: the tensors as the
file's tensors, the rest as a JSON skeleton (each tensor replaced by its key) in the
header's metadata.  ``read_tree`` parses that JSON and the tensor bytes, nothing else, so a
file can only ever yield data.

Files written by ``torch.save`` (the format-1 checkpoints of earlier code) are read by
``read_torch_file`` with ``torch.load(weights_only=True)``: tensors and plain containers
only; a file that pickles anything else (which could run code while loading) is refused
with one line.

Writes are atomic (a temporary file in the same folder, flushed, renamed over the target)
and get the user's umask, like any other file.  ``clean_temp_files`` removes temporary
files a killed writer left behind.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets

import torch

from common.errors import FlowlabError

TMP_PREFIX = ".tmp-"
SKELETON_KEY = "flowlab.tree"   # metadata entry holding the JSON skeleton
KIND_KEY = "flowlab.kind"       # metadata entry naming what the file is ("training-state", "model")


# ---- sniffing ---------------------------------------------------------------------------------

def file_format(path: str) -> str:
    """``"safetensors"``, ``"torch"`` (a torch.save zip or legacy pickle) or ``"unknown"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 1 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"        # a torch.save zip, or a legacy / plain pickle
    return "unknown"


# ---- atomic writes ----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a fresh temporary path beside ``path`` (created with the user's umask); on success
    it is flushed to disk and renamed over ``path``, on any error removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(6)}-{os.path.basename(path)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # 0666 & ~umask, as for any new file
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced it with a private (0600) file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def clean_temp_files(folder: str) -> list[str]:
    """Remove the temporary files an interrupted write left in ``folder``; returns their paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*"))):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def _unshared(tensors: dict) -> dict:
    """Contiguous tensors, none sharing memory with another (safetensors stores each once)."""
    seen, out = set(), {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def write_tensors(path: str, tensors: dict, metadata: dict) -> None:
    """Atomically write ``{name: tensor}`` with string ``metadata`` as a safetensors file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(_unshared(tensors), tmp, metadata={k: str(v) for k, v in metadata.items()})


def read_tensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a damaged one is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: a truncated or corrupt file
        raise FlowlabError(f"{path} is corrupt or truncated ({' '.join(str(e).split())[:120]})") from None
    return tensors, metadata


def read_metadata(path: str) -> dict:
    """The metadata of a safetensors file without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise FlowlabError(f"{path} is corrupt or truncated ({' '.join(str(e).split())[:120]})") from None


# ---- trees of plain data and tensors ------------------------------------------------------------

def _encode(value, key: str, tensors: dict):
    """The JSON skeleton of ``value``; its tensors go into ``tensors`` under unique keys."""
    if isinstance(value, torch.Tensor):
        name = key or "tensor"
        while name in tensors:
            name += "+"
        tensors[name] = value
        return {"$tensor": name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{key}/{k}" if key else k, tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, "", {}), _encode(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a tensor file (at {key or 'the top'})")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$tuple"}:
            return tuple(_decode(v, tensors) for v in value["$tuple"])
        if set(value) == {"$items"}:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["$items"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _hashable(key):
    if isinstance(key, (list, dict, torch.Tensor)):
        raise ValueError("a mapping key must be a number or a string")
    return key


def write_tree(path: str, tree, kind: str, metadata: dict | None = None) -> None:
    """Atomically write a tree of plain data and tensors (see the module docstring)."""
    tensors = {}
    skeleton = json.dumps(_encode(tree, "", tensors))
    write_tensors(path, tensors, {**(metadata or {}), KIND_KEY: kind, SKELETON_KEY: skeleton})


def read_tree(path: str, kind: str):
    """The tree ``write_tree`` stored with ``kind``; any other file is a one-line error."""
    tensors, metadata = read_tensors(path)
    if metadata.get(KIND_KEY) != kind or SKELETON_KEY not in metadata:
        raise FlowlabError(f"{path} is not a flowlab {kind} file (it is {metadata.get(KIND_KEY) or 'another safetensors file'})")
    try:
        return _decode(json.loads(metadata[SKELETON_KEY]), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FlowlabError(f"{path} is corrupt: its {kind} structure does not parse ({type(e).__name__})") from None


# ---- torch.save files (format-1 checkpoints) ----------------------------------------------------

def read_torch_file(path: str):
    """A ``torch.save`` file loaded with weights-only unpickling; refused (one line) if it needs more."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise FlowlabError(f"checkpoint {path} is corrupt or truncated (UnpicklingError)") from None
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it pickles {found[0]})" if found else ""
        raise FlowlabError(f"refusing to load {path}: it holds Python objects beyond tensors and plain data{what}, "
                           f"which could run code while loading; flowlab never unpickles those") from None
    except Exception as e:  # torch raises many types for truncated / corrupt files
        raise FlowlabError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None
