"""Fused losses for TagAlign: Triton kernels beside their plain-PyTorch references.

    kernels.clip_loss(image_emb, text_emb, scale, impl="auto")
    kernels.clip_loss_one_sided(query, keys, scale, offset=0, impl="auto")
    kernels.tag_loss(image_emb, tag_emb, targets, scale, kind="softmax", impl="auto")

impl: "auto" (Triton for CUDA tensors; on CPU the reference, or the chunked torch path when
the logits, N x N or N x K, would exceed AUTO_CHUNK_LOGITS = 2^24 in kernels/clip_loss.py),
"triton", "torch" (the reference, O(N^2) memory), "chunked" (the kernels' algorithm in torch,
O((N + K) D) memory). All return a 0-d fp32 loss with gradients to the embeddings and scale.

Without a GPU, importing this package sets TRITON_INTERPRET=1 (unless already set) before the
kernel modules define their @triton.jit functions: triton reads the variable when a function is
decorated, so impl="triton" then runs through Triton's CPU interpreter (slow; for tests).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .clip_loss import (  # noqa: E402
    IMPLS, INTERPRET, clip_loss, clip_loss_one_sided, clip_loss_one_sided_ref, clip_loss_ref)
from .tag_loss import KINDS, tag_loss, tag_loss_ref  # noqa: E402

__all__ = ["clip_loss", "clip_loss_one_sided", "clip_loss_ref", "clip_loss_one_sided_ref",
           "tag_loss", "tag_loss_ref", "IMPLS", "KINDS", "INTERPRET"]
