"""Writes tests/fixtures/hostile/: small files that each once crashed, hung or fooled mood (issue 19,
defects D1-D10), for tests/hostile_files.rs.

Plain python3, no packages: every file is assembled byte by byte (the .npy headers, safetensors,
zip archives and pickles are simple formats), so the fixtures do not depend on numpy's or torch's
version and CI never needs either. Run from anywhere: `python3 tools/make_hostile_fixtures.py`.
"""
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hostile")


def write(rel, data):
    path = os.path.join(OUT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def npy(descr, shape, body, version=1, header=None):
    """A .npy file; `header` replaces the dict text when given (for broken headers)."""
    if header is None:
        dims = "(%s)" % ("%d," % shape[0] if len(shape) == 1 else ", ".join(str(d) for d in shape))
        header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, dims)
    text = header.encode("latin1")
    if version == 1:
        pad = (64 - (10 + len(text) + 1) % 64) % 64
        text += b" " * pad + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body
    pad = (64 - (12 + len(text) + 1) % 64) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text + body


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def safetensors(tensors, metadata):
    """tensors: name -> (shape, list of floats) as F32."""
    header = {"__metadata__": metadata}
    body = b""
    for name, (shape, values) in tensors.items():
        data = f32(values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body


def detector(method, args, dim, tensors):
    meta = {"mood_detector": json.dumps({"method": method, "args": args, "dim": dim, "mood_version": "0.1.0"})}
    tensors = dict(tensors)
    tensors["detector_format"] = ([1], [1.0])
    return safetensors(tensors, meta)


# --- torch.save-like pickles without torch: stand-in modules so pickle names the same globals.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch.__path__ = []


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class TensorView:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, key, numel, offset, size, stride):
        self.storage = ("storage", FloatStorage, key, "cpu", numel)
        self.args = (offset, size, stride)

    def __reduce__(self):
        offset, size, stride = self.args
        return (_rebuild_tensor_v2, (StorageRef(self.storage), offset, size, stride, False, OrderedDict()))


class StorageRef:
    def __init__(self, record):
        self.record = record


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.record if isinstance(obj, StorageRef) else None


def pth(pkl, storages=()):
    """A torch.save zip: archive/data.pkl and archive/data/<key>, stored uncompressed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in storages:
            z.writestr("archive/data/%s" % key, data)
    return buf.getvalue()


def torch_pickle(obj):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def main():
    # A store of 3 rows of 4 features, the target of the detector files below.
    write("store3x4/features.npy", npy("<f4", [3, 4], f32([float(i % 5) for i in range(12)])))

    # D1: a version-2 header that announces 4 GiB.
    write("d1_npy_header_4gib.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{'descr'")

    # D2: a 258-byte header of nested brackets (a Python literal parser recurses into it).
    nested = "{'descr': " + "[" * 120 + "(" * 120
    write("d2_npy_nested_header.npy", npy("<f4", [1], b"", header=nested))

    # D3: a label of 2^40 and no class list (the manifest's key is misspelt, so serde ignores it).
    d3 = "d3_label_2pow40"
    write(d3 + "/features.npy", npy("<f4", [4, 2], f32([0.1 * i for i in range(8)])))
    write(d3 + "/labels.npy", npy("<i8", [4], struct.pack("<4q", 0, 1, 0, 1 << 40)))
    write(d3 + "/manifest.json", json.dumps({"format": 1, "count": 4, "dim": 2, "clases": ["a", "b"]}).encode())

    # D4: a knn bank 2 wide in a detector whose header says 4: 6 "rows" of a 3-row store.
    write("d4_knn_width.safetensors", detector("knn", {"k": "1"}, 4, {"train": ([6, 2], [0.5] * 12)}))

    # D5: a list that doubles with each DUP+APPEND and each MEMOIZE+GET+APPEND: 2^40 nodes.
    prog = b"\x80\x02]" + b"2a" * 20 + b"q\x00h\x00a" * 20 + b"."
    write("d5_pickle_doubling.pth", pth(prog))

    # D6: a stored zip entry whose sizes claim 4 GiB in a few hundred bytes.
    ok = torch_pickle(OrderedDict(w=TensorView("0", 1, 0, (1,), (1,))))
    z = bytearray(pth(ok, [("0", f32([1.0]))]))
    lh = z.index(b"PK\x03\x04")
    ch = z.index(b"PK\x01\x02")
    struct.pack_into("<II", z, lh + 18, 0xFFFFFFF0, 0xFFFFFFF0)
    struct.pack_into("<II", z, ch + 20, 0xFFFFFFF0, 0xFFFFFFF0)
    write("d6_zip_entry_4gib.pth", bytes(z))

    # D7: a stride-0 view of 2^40 elements over a 4-byte storage.
    view = torch_pickle(OrderedDict(w=TensorView("0", 1, 0, (1 << 40,), (0,))))
    write("d7_stride0_view.pth", pth(view, [("0", f32([1.0]))]))

    # D8: features of shape (2^62 + 1, 4) with 16 data bytes: the shape's product wraps to 4.
    d8 = "d8_wrapped_shape"
    write(d8 + "/features.npy", npy("<f4", [(1 << 62) + 1, 4], f32([1.0, 2.0, 3.0, 4.0])))

    # D9: images of shape (2^62 + 1, 3, 32, 32) with one image's data (the product wraps to 3072).
    write("d9_wrapped_images.npy", npy("<f4", [(1 << 62) + 1, 3, 32, 32], f32([0.0] * 3072)))

    # D10: detector files whose one-value settings are empty.
    head = {"head.weight": ([2, 4], [0.1] * 8), "head.bias": ([2], [0.0, 0.0])}
    write("d10_react_empty_clip.safetensors", detector(
        "react", {"percentile": "0.9"}, 4, dict(head, **{"react.clip": ([0], [])})))
    write("d10_vim_empty_alpha.safetensors", detector("vim", {"dim": "1"}, 4, dict(head, **{
        "vim.origin": ([4], [0.0] * 4), "vim.ns": ([1, 4], [1.0, 0.0, 0.0, 0.0]), "vim.alpha": ([0], [])})))
    write("d10_csd_empty_tokens.safetensors", detector(
        "csd", {"k": "1"}, 4, {"train": ([2, 4], [0.5] * 8), "tokens": ([0], [])}))
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
