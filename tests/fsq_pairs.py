"""FSQ with pre_norm beside its unfused form (its own BatchNorm1d, then FSQ without
pre_norm), for the tests of the folded normalisation."""

import torch

import stabq
from stabq.quantizers.fsq import pre_normalise

LEVELS = [[8, 8, 8, 5, 5, 5], [8, 5, 5, 5], [16, 16, 16, 16], [3], [2, 7]]


def pair(levels, bound, dtype, momentum=0.1):
    """The fused FSQ, the unfused reference's BatchNorm1d and its FSQ without pre_norm,
    with the same non-trivial running statistics."""
    fused = stabq.FSQ(levels, pre_norm=True, bound=bound).to(dtype)
    norm = fused.pre_norm
    norm.momentum = momentum
    gen = torch.Generator().manual_seed(3)
    norm.running_mean.copy_(torch.randn(len(levels), generator=gen))
    norm.running_var.copy_(torch.rand(len(levels), generator=gen) + 0.5)
    norm.num_batches_tracked.fill_(4)
    reference = torch.nn.BatchNorm1d(len(levels), affine=False, momentum=momentum).to(dtype)
    reference.load_state_dict(norm.state_dict())
    return fused, reference, stabq.FSQ(levels, bound=bound).to(dtype)


def run_both(fused, reference, plain, z, training, upstream):
    """One forward and backward of both forms: ``(out, z's grad, reference out, its grad)``."""
    for m in (fused, reference, plain):
        m.train(training)
    zf = z.clone().requires_grad_()
    out = fused(zf)
    out.quantized.backward(upstream)
    zr = z.clone().requires_grad_()
    ref = plain(pre_normalise(reference, zr))
    ref.quantized.backward(upstream)
    return out, zf.grad, ref, zr.grad
