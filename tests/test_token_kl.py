"""token_kl through the shared token-loss base: causal shift, -100 mask, vocabulary slice, step normaliser."""
import torch
from torch.nn import functional as F

from kdgraph.methods.token_kl import TokenKL


def _manual(s, t, labels, T=1.0, vocab=None):
    s, t, lab = s[:, :-1], t[:, :-1], labels[:, 1:]
    if vocab is not None:
        s, t = s[..., :vocab], t[..., :vocab]
    keep = lab != -100
    ls, lt = F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1)
    return F.kl_div(ls, lt, log_target=True, reduction="sum") / keep.sum()


def test_token_kl_matches_masked_shifted_kl_and_split_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, 40, generator=g, requires_grad=True)
    t = torch.randn(4, 9, 40, generator=g)
    labels = torch.randint(0, 32, (4, 9), generator=g)
    labels[0, :4] = -100        # a prompt
    labels[2, 6:] = -100        # padding
    loss = TokenKL(temperature=2.0, vocab_size=32)(s, t, labels)
    ref = _manual(s, t, labels, 2.0, 32)
    torch.testing.assert_close(loss, ref)
    (g_loss,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_loss, g_ref)
    assert g_loss[..., 32:].abs().sum() == 0            # padded vocabulary rows get no gradient
    # two micro-batches with the step's token count give the same gradient as the whole batch
    n = (labels[:, 1:] != -100).sum()
    kl = TokenKL(temperature=2.0, vocab_size=32)
    parts = sum(torch.autograd.grad(kl(s[i:i + 2], t[i:i + 2], labels[i:i + 2], n), s)[0] for i in (0, 2))
    torch.testing.assert_close(parts, g_ref)
