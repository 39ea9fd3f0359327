#!/usr/bin/env python3
"""Training references from PyTorch for tests/train_*.rs (grows with the training issue).

Now: cross-entropy with label smoothing (torch.nn.CrossEntropyLoss(label_smoothing=0.1)) on random
logits: tests/fixtures/train/ce_{logits,labels,loss,grad}.npy (labels stored as float32).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train")


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(6, 10, generator=g)).requires_grad_(True)
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    loss.backward()
    np.save(os.path.join(OUT, "ce_logits.npy"), logits.detach().numpy().astype(np.float32))
    np.save(os.path.join(OUT, "ce_labels.npy"), labels.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "ce_loss.npy"), np.array([loss.item()], dtype=np.float32))
    np.save(os.path.join(OUT, "ce_grad.npy"), logits.grad.numpy().astype(np.float32))
    print(f"cross-entropy (label smoothing 0.1): {loss.item():.6f}")


if __name__ == "__main__":
    main()
