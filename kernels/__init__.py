"""Fused losses for TagAlign: Triton kernels beside their plain-PyTorch references.

    kernels.clip_loss(image_emb, text_emb, scale, impl="auto")
    kernels.clip_loss_one_sided(query, keys, scale, offset=0, impl="auto")
    kernels.tag_loss(image_emb, tag_emb, targets, scale, kind="softmax", impl="auto")

impl: "auto" (Triton for CUDA tensors; on CPU the reference, or the chunked torch path when
the logits would exceed AUTO_CHUNK_LOGITS), "triton", "torch" (the reference), "chunked".

Without a GPU, importing this package sets TRITON_INTERPRET=1 (unless already set) before the
kernel modules define their @triton.jit functions: triton reads the variable when a function is
decorated, so impl="triton" then runs through Triton's CPU interpreter (slow; for tests).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .clip_loss import (  # noqa: E402
    AUTO_CHUNK_LOGITS, IMPLS, INTERPRET, clip_loss, clip_loss_one_sided, clip_loss_one_sided_ref,
    clip_loss_ref)
from .tag_loss import KINDS, tag_loss, tag_loss_ref  # noqa: E402

__all__ = ["clip_loss", "clip_loss_one_sided", "clip_loss_ref", "clip_loss_one_sided_ref",
           "tag_loss", "tag_loss_ref", "IMPLS", "KINDS", "INTERPRET", "AUTO_CHUNK_LOGITS"]
