#!/usr/bin/env python3
"""Tiny fake CIFAR-10 and CIFAR-100 in both official layouts, with torchvision's reading of them,
for tests/cifar.rs. Writes tests/fixtures/cifar/:

  cifar10/cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta   (python version)
  cifar10/cifar-10-batches-bin/  data_batch_1..5.bin, test_batch.bin, batches.meta.txt
  cifar100/cifar-100-python/     train, test, meta
  cifar100/cifar-100-binary/     train.bin, test.bin, fine_label_names.txt, coarse_label_names.txt
  variants/                      the CIFAR-10 test batch pickled again by Python 3 (protocols 2, 4, 5)
  *.npy, cases.json              torchvision's tensors for some images

The pixels are random uint8 (seed 0), the same in both layouts. The python batches are written
opcode by opcode as Python 2's cPickle wrote the originals (protocol 2; keys, label names and the
array's data as Python 2 `str`, i.e. bytes; the array through numpy.core.multiarray._reconstruct,
numpy.dtype and BUILD), so `pickle.load(f, encoding='bytes')` gives b'data', b'labels' as for the
real files, and torchvision (encoding='latin1') reads them as it reads the real ones. The binary
records are label byte(s) then the 3072 pixel bytes (CIFAR-100: coarse, fine).

References: torchvision.datasets.CIFAR10/CIFAR100(root, train=..., download=False) over the
python layout (the md5 integrity check is patched out: the files are not the real ones) with
  cifar     ToTensor, Normalize(CIFAR mean/std as MODE)    (32x32, no resize)
  mood      Resize(int(S/0.875), BICUBIC), CenterCrop(S), ToTensor, Normalize(0.5, 0.5)   S = 56
written from torchvision's documentation and src/data/preprocess.rs's preset table.
"""
import json
import os
import pickle
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms as T  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "cifar")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
CIFAR100_NAMES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_COARSE = """aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores
large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1
vehicles_2""".split()
assert len(CIFAR100_NAMES) == 100 and len(CIFAR100_COARSE) == 20

# Images per file: CIFAR-10's five train batches and test batch, CIFAR-100's train and test.
C10_TRAIN_PER_BATCH, C10_TEST, C100_TRAIN, C100_TEST = 2, 2, 5, 2
# Which images get reference tensors, per (data set, split, preset).
REFERENCES = [
    ("cifar10", "test", "cifar", 32, [0, 1]),
    ("cifar10", "train", "cifar", 32, [0, 9]),
    ("cifar100", "test", "cifar", 32, [0]),
    ("cifar100", "train", "cifar", 32, [4]),
    ("cifar10", "test", "mood", 56, [0]),
]


class Global:
    def __init__(self, module, name):
        self.module, self.name = module, name


class Py2Pickle:
    """Python 2 cPickle's protocol 2 output for the types CIFAR's files hold. A Python 2 str is
    given here as bytes, a tuple as a tuple, a numpy uint8 array as an ndarray."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self):
        self.memo += 1
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def save(self, obj):
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True or obj is False:
            o += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                o += b"K" + bytes([obj])
            elif 0 <= obj < 65536:
                o += b"M" + struct.pack("<H", obj)
            else:
                o += b"J" + struct.pack("<i", obj)
        elif isinstance(obj, bytes):
            o += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
            self.put()
        elif isinstance(obj, tuple):
            if not obj:
                o += b")"
                return
            if len(obj) <= 3:
                for x in obj:
                    self.save(x)
                o += bytes([0x84 + len(obj)])
            else:
                o += b"("
                for x in obj:
                    self.save(x)
                o += b"t"
            self.put()
        elif isinstance(obj, list):
            o += b"]"
            self.put()
            self.batched(obj, b"a", b"e", lambda x: self.save(x))
        elif isinstance(obj, dict):
            o += b"}"
            self.put()
            self.batched(list(obj.items()), b"s", b"u", lambda kv: (self.save(kv[0]), self.save(kv[1])))
        elif isinstance(obj, Global):
            self.glob(obj.module, obj.name)
        elif isinstance(obj, np.ndarray):
            assert obj.dtype == np.uint8 and obj.flags.c_contiguous
            self.glob("numpy.core.multiarray", "_reconstruct")
            self.save((Global("numpy", "ndarray"), (0,), b"b"))
            self.out += b"R"
            self.put()
            self.out += b"("
            for x in (1, tuple(obj.shape)):
                self.save(x)
            self.glob("numpy", "dtype")
            self.save((b"u1", 0, 1))
            self.out += b"R"
            self.put()
            self.save((3, b"|", None, None, None, -1, -1, 0))
            self.out += b"b"
            self.save(False)
            self.save(obj.tobytes())
            self.out += b"t"
            self.put()
            self.out += b"b"
        else:
            raise TypeError(type(obj))

    def glob(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put()

    def batched(self, items, one, many, save):
        # cPickle writes containers in batches of 1000 (APPENDS / SETITEMS), a lone item with
        # APPEND / SETITEM.
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            if len(chunk) == 1:
                save(chunk[0])
                self.out += one
            else:
                self.out += b"("
                for x in chunk:
                    save(x)
                self.out += many

    def dumps(self, obj):
        self.save(obj)
        self.out += b"."
        return bytes(self.out)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def filenames(tag, n, start):
    return [f"{tag}_s_{start + i:06d}.png".encode() for i in range(n)]


def make_cifar10(rng):
    py = os.path.join(OUT, "cifar10", "cifar-10-batches-py")
    bn = os.path.join(OUT, "cifar10", "cifar-10-batches-bin")
    batches = [(f"data_batch_{i}", f"training batch {i} of 5", C10_TRAIN_PER_BATCH) for i in range(1, 6)]
    batches.append(("test_batch", "testing batch 1 of 1", C10_TEST))
    start = 0
    for name, label, n in batches:
        x, y = images(rng, n), [int(v) for v in rng.integers(0, 10, size=n)]
        # The originals' key order.
        d = {b"batch_label": label.encode(), b"labels": y, b"data": x,
             b"filenames": filenames("fixture", n, start)}
        write(os.path.join(py, name), Py2Pickle().dumps(d))
        write(os.path.join(bn, name + ".bin"),
              b"".join(bytes([y[i]]) + x[i].tobytes() for i in range(n)))
        start += n
    meta = {b"num_cases_per_batch": C10_TRAIN_PER_BATCH, b"label_names": [s.encode() for s in CIFAR10_NAMES],
            b"num_vis": 3072}
    write(os.path.join(py, "batches.meta"), Py2Pickle().dumps(meta))
    write(os.path.join(bn, "batches.meta.txt"), ("\n".join(CIFAR10_NAMES) + "\n\n").encode())


def make_cifar100(rng):
    py = os.path.join(OUT, "cifar100", "cifar-100-python")
    bn = os.path.join(OUT, "cifar100", "cifar-100-binary")
    start = 0
    for name, label, n in [("train", "training batch 1 of 1", C100_TRAIN),
                           ("test", "testing batch 1 of 1", C100_TEST)]:
        x = images(rng, n)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [int(v) for v in rng.integers(0, 20, size=n)]
        d = {b"filenames": filenames("fixture", n, start), b"batch_label": label.encode(),
             b"fine_labels": fine, b"coarse_labels": coarse, b"data": x}
        write(os.path.join(py, name), Py2Pickle().dumps(d))
        write(os.path.join(bn, name + ".bin"),
              b"".join(bytes([coarse[i], fine[i]]) + x[i].tobytes() for i in range(n)))
        start += n
    meta = {b"fine_label_names": [s.encode() for s in CIFAR100_NAMES],
            b"coarse_label_names": [s.encode() for s in CIFAR100_COARSE]}
    write(os.path.join(py, "meta"), Py2Pickle().dumps(meta))
    write(os.path.join(bn, "fine_label_names.txt"), ("\n".join(CIFAR100_NAMES) + "\n").encode())
    write(os.path.join(bn, "coarse_label_names.txt"), ("\n".join(CIFAR100_COARSE) + "\n").encode())


def make_variants():
    """The CIFAR-10 test batch as Python 3 re-saves it: protocol 2 (bytes via _codecs.encode),
    4 (text keys, labels as an int64 array) and 5 (the array as _frombuffer over a bytearray)."""
    with open(os.path.join(OUT, "cifar10", "cifar-10-batches-py", "test_batch"), "rb") as f:
        d = pickle.load(f, encoding="bytes")
    out = os.path.join(OUT, "variants")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "test_batch.p2"), "wb") as f:
        pickle.dump(d, f, protocol=2)
    text = {k.decode(): v for k, v in d.items()}
    text["labels"] = np.array(text["labels"], dtype=np.int64)
    with open(os.path.join(out, "test_batch.p4"), "wb") as f:
        pickle.dump(text, f, protocol=4)
    with open(os.path.join(out, "test_batch.p5"), "wb") as f:
        pickle.dump(d, f, protocol=5)


def transform(preset, s):
    if preset == "cifar":
        assert s == 32
        return T.Compose([T.ToTensor(), T.Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])])
    if preset == "mood":
        return T.Compose([T.Resize(int(s / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(s), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    raise ValueError(preset)


def references():
    # The files are not the real ones: skip torchvision's md5 checks.
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    torchvision.datasets.CIFAR10._check_integrity = lambda self: True
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    cases = []
    for ds, split, preset, s, idx in REFERENCES:
        d = cls[ds](os.path.join(OUT, ds), train=split == "train", download=False,
                    transform=transform(preset, s))
        x = np.stack([d[i][0].numpy() for i in idx]).astype(np.float32)
        exp = f"{ds}.{split}.{preset}{s}.npy"
        np.save(os.path.join(OUT, exp), x)
        cases.append({"dataset": ds, "split": split, "preset": preset, "img_size": s,
                      "indices": idx, "expected": f"cifar/{exp}", "labels": [int(t) for t in d.targets],
                      "classes": list(d.classes), "count": len(d)})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    rng = np.random.default_rng(0)
    make_cifar10(rng)
    make_cifar100(rng)
    # The batches read back as the originals do.
    with open(os.path.join(OUT, "cifar10", "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (C10_TRAIN_PER_BATCH, 3072)
    assert isinstance(d[b"labels"], list)
    make_variants()
    references()
    total = 0
    for dirpath, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in files)
    print(f"{total / 1024:.1f} KiB in {OUT}")


if __name__ == "__main__":
    main()
