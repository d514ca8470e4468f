"""Training losses beyond the model's own causal-LM loss."""

import torch


def soft_coordinate_loss(coord_start: int, num_bins: int, sigma: float):
    """Causal-LM loss where a coordinate-token target is a Gaussian over neighbouring bins instead of one bin.

    An off-by-one coordinate is nearly right and the one-hot loss does not know it; the soft target gives every near
    miss a useful gradient and matches the sin/cos order of the coordinate embeddings. Only for
    ``box_format="tokens"`` (in the text format a coordinate is several digit tokens). Signature of
    ``Trainer(compute_loss_func=...)``: (outputs, unshifted labels, num_items_in_batch).
    """
    grid = torch.arange(num_bins, dtype=torch.float32)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        labels = labels[:, 1:].to(logits.device)
        mask = labels != -100
        logp = logits[mask].log_softmax(-1)  # (tokens, vocab)
        target = labels[mask]
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        if sigma > 0:
            is_coord = (target >= coord_start) & (target < coord_start + num_bins)
            if is_coord.any():
                centre = (target[is_coord] - coord_start).float()
                soft = torch.exp(-0.5 * ((grid.to(logp.device)[None] - centre[:, None]) / sigma) ** 2)
                soft = soft / soft.sum(1, keepdim=True)  # (coord tokens, bins)
                nll = nll.clone()
                nll[is_coord] = -(soft * logp[is_coord][:, coord_start : coord_start + num_bins]).sum(1)
        if num_items_in_batch is not None:
            return nll.sum() / num_items_in_batch
        return nll.mean()

    return loss_fn


def pcgrad(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1) on flat per-task
    gradients: each g_i, for every other task's *original* g_j (in order; PCGrad draws the order at random, which for
    two tasks changes nothing) with g_i . g_j < 0, loses its component along g_j; returns (sum of the projected
    gradients, the cosine of the first two original gradients, or 0 when one of them is zero)."""
    originals = [g.float() for g in grads]
    projected = []
    for i, g in enumerate(originals):
        g = g.clone()
        for j, other in enumerate(originals):
            dot = torch.dot(g, other)
            if j != i and dot < 0:
                g -= dot / other.pow(2).sum() * other
        projected.append(g)
    cosine = originals[0].new_zeros(())
    if len(originals) > 1 and originals[0].norm() > 0 and originals[1].norm() > 0:
        cosine = torch.dot(originals[0], originals[1]) / (originals[0].norm() * originals[1].norm())
    return torch.stack(projected).sum(0), cosine
