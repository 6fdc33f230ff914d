"""--grad_checkpoint on the official attentive VAE (nvae.py): every residual tower recomputed in the
backward pass gives the plain backward's gradients and moves the batch-norm statistics once.
(The very deep VAE's twin tests are in test_model.py.)"""
import pytest
import torch

import nvae
from test_nvae import SMALL, open_model


def train_pass(vae, x, eps, noise):
    vae.zero_grad(set_to_none=True)
    out = vae(x, x, eps, noise)
    ((out['distortion'] + out['rate']).mean() + vae.l2_penalty()).backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    return out, grads, {n: b.clone() for n, b in vae.named_buffers()}


@pytest.mark.parametrize('config', [SMALL, dict(SMALL, enc_key=0, dec_key=0)], ids=['attentive', 'baseline'])
def test_grad_checkpoint_gives_the_plain_gradients_and_statistics(config):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    plain_vae, ckpt_vae = open_model(config, seed=2).train(), open_model(config, seed=2).train()
    ckpt_vae.set_grad_checkpoint(True)
    L, Z = config['num_layers'], config['zdim']
    eps = [torch.randn(3, Z, 4, 4, dtype=torch.float64) for _ in range(L)]
    noise = [(None if i == 0 else torch.randn(3, Z, 4, 4, dtype=torch.float64), torch.randn(3, Z, 4, 4, dtype=torch.float64))
             for i in range(L)]
    out, grads, stats = train_pass(plain_vae, x, eps, noise)
    out_c, grads_c, stats_c = train_pass(ckpt_vae, x, eps, noise)
    torch.testing.assert_close(out['kl'], out_c['kl'], rtol=0, atol=0)
    assert grads.keys() == grads_c.keys() and len(grads) > 50
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-6, atol=1e-12, msg=n)
    for n in stats:                    # moved once, not twice by the recompute
        assert torch.equal(stats_c[n], stats[n]), n
    assert any(not torch.equal(b, open_model(config, seed=2).state_dict()[n]) for n, b in stats.items())


def test_grad_checkpoint_keeps_fewer_activations_for_the_backward():
    vae = open_model(SMALL, seed=3).train()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1

    def saved(on):
        vae.set_grad_checkpoint(on)
        total = [0]
        def pack(t):
            total[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vae(x, x)
        return total[0]
    assert saved(True) < 0.5 * saved(False)
