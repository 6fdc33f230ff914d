"""
What only a GPU can show, run by `bash gpu_check.sh` on a CUDA machine; on a CPU machine every
test here is skipped with that reason (the `cuda` marker).
"""
import pytest
import torch

import convert
import model
import train
from test_model import SMALL, batch, layer_noise, small_vae
from test_nvae import D, check_gradients, reference_run as attentive_run, rel
from test_reference import REFERENCE, nchw

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (bash gpu_check.sh there)')]


@pytest.fixture(autouse=True)
def strict_fp32():
    """Full fp32 convolutions and matmuls (Ampere and later default to TF32 for convolutions)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def test_official_reference_outputs_and_gradients_on_cuda():
    if not REFERENCE.exists():
        pytest.fail(f'reference data not found: looked for {REFERENCE} (set HVAE_DATA)')
    d = torch.load(REFERENCE, weights_only=True)
    vae = convert.load_official_vdvae(model.VAE(d['config']), d['state_dict']).cuda()
    x, target = nchw(d['x_in_nhwc']).cuda(), nchw(d['target_nhwc']).cuda()
    out = vae(x, target, eps=[e.cuda() for e in d['eps_posterior']])
    torch.testing.assert_close(out['kl'].cpu(), d['kl_per_layer'], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out['distortion'].cpu(), d['distortion'], rtol=1e-5, atol=1e-6)
    (out['distortion'] + out['rate']).mean().backward()
    names = {n: p for n, p in vae.named_parameters()}
    for official, g in d['grads'].items():
        name = f'decoder.state.{g.shape[-1]}' if official.startswith('decoder.bias_xs.') else convert.official_name(official)
        torch.testing.assert_close(names[name].grad.cpu(), g, rtol=1e-3, atol=1e-3 * g.abs().max().item() + 1e-8)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_official_attentive_outputs_and_gradients_on_cuda_in_fp32(mode):
    """The attentive fixture in fp32 on the GPU: the non-local blocks through SDPA's fused kernel
    (the CPU tests take the plain softmax path), the fused weight norm and the penalty's foreach
    calls. On the CPU in fp32 the same check gives 2e-7 on the outputs and 5e-5 on the gradients."""
    r = attentive_run(mode, device='cuda', dtype=torch.float32)
    d = r['d']
    assert rel(r['out']['distortion'] * D, d[f'{mode}/nll']) < 1e-5
    assert rel(r['out']['kl'], d[f'{mode}/kl_per_layer']) < 1e-5
    assert rel(r['loss'], d[f'{mode}/loss']) < 1e-5
    check_gradients(r, mode, tol=1e-3)


def test_bf16_autocast_keeps_likelihood_and_kl_in_fp32_and_close():
    vae = small_vae(1).cuda()
    x, target = (t.cuda() for t in batch(4, seed=1))
    eps = [e.cuda() for e in layer_noise(vae, 4, seed=2)]
    ref = vae(x, target, eps)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = vae(x, target, eps)
    assert out['distortion'].dtype == out['kl'].dtype == torch.float32
    torch.testing.assert_close(out['distortion'], ref['distortion'], rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(out['rate'], ref['rate'], rtol=1e-1, atol=1e-3)


def test_channels_last_on_cuda_gives_the_same_outputs():
    vae = small_vae(2).cuda()
    x, target = (t.cuda() for t in batch(4, seed=3))
    eps = [e.cuda() for e in layer_noise(vae, 4, seed=4)]
    ref = vae(x, target, eps)
    out = vae.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), target, eps)
    torch.testing.assert_close(out['kl'], ref['kl'], rtol=1e-4, atol=1e-6)


def test_grad_checkpoint_cuts_peak_memory_with_the_same_gradients():
    config = train.make_config(train.parse_args(['--preset', 'cpu']))
    torch.manual_seed(0)
    vae = model.VAE(config).cuda()
    x = torch.randn(32, 3, 32, 32, device='cuda')
    target = (torch.randint(0, 256, x.shape, device='cuda') / 127.5 - 1)
    eps = [torch.randn(32, config['zdim'], l.res, l.res, device='cuda') for l in vae.decoder.layers]

    def step(on):
        vae.set_grad_checkpoint(on).zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = vae(x, target, eps)
        (out['distortion'] + out['rate']).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, [p.grad.clone() for p in vae.parameters()]
    plain_peak, plain = step(False)
    ckpt_peak, ckpt = step(True)
    assert ckpt_peak < 0.6 * plain_peak, (ckpt_peak, plain_peak)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fp16_step_with_the_grad_scaler_updates_the_weights():
    config = train.make_config(train.parse_args(['--preset', 'cpu', '--dtype', 'fp16', '--batch_size', '8']))
    torch.manual_seed(0)
    vae = model.VAE(config).cuda()
    optimizer = train.make_optimizer(vae, config)
    scaler = torch.amp.GradScaler('cuda')
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device='cuda')
    info = dict(binary=False, shift=-127.5, scale=1 / 64)
    before = [p.detach().clone() for p in vae.parameters()]
    stats, skipped = train.train_step(vae, optimizer, images, info, config, scaler=scaler)
    assert not skipped and torch.isfinite(torch.tensor(stats['elbo']))
    assert any(not torch.equal(a, p) for a, p in zip(before, vae.parameters()))
