"""Sigmoid cross-entropy with logits, mean over the batch.

    loss_n = -y log s(l) - (1-y) log(1-s(l)),  s = sigmoid
           = max(l, 0) - l*y + log(1 + exp(-|l|))      (stable: no overflow, no log(0))
    loss   = mean_n loss_n
    dloss/dl_n = (s(l_n) - y_n) / N
"""
from .backend import get_xp
from .layers import sigmoid


def sigmoid_cross_entropy(logits, y, check_finite=False):
    """Mean binary cross-entropy of logits against 0/1 targets.

    logits: (...) float, any shape
    y:      (...) same shape, targets in [0, 1]
    check_finite: raise ValueError on non-finite logits or targets outside [0, 1]. Off by
            default because the check forces a device sync every step; the training loop
            instead checks the running loss where it logs it (train.TrainingDiverged).
    returns (loss, dlogits): loss a 0-d array of the logits' dtype (not a Python
    float: converting forces a GPU sync, do it only where the loss is logged),
    dlogits of the logits' shape.
    """
    if logits.shape != y.shape:
        raise ValueError(f"sigmoid_cross_entropy: logits {tuple(logits.shape)} and labels "
                         f"{tuple(y.shape)} must have the same shape")
    if logits.size == 0:
        raise ValueError("sigmoid_cross_entropy: empty batch")
    xp = get_xp(logits, y)
    if check_finite:
        if not bool(xp.isfinite(logits).all()):
            raise ValueError("sigmoid_cross_entropy: the logits contain NaN or inf")
        if not bool(((y >= 0) & (y <= 1)).all()):
            raise ValueError("sigmoid_cross_entropy: targets must lie in [0, 1]")
    y = y.astype(logits.dtype, copy=False)
    n = logits.size
    loss = (xp.maximum(logits, 0) - logits * y + xp.log1p(xp.exp(-xp.abs(logits)))).mean()
    dlogits = (sigmoid(logits) - y) / n
    return loss, dlogits
