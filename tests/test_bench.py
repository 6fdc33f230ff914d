"""bench.py: every row says how long it waited for a CPU, and --against runs a second checkout's
code in the same invocation (the before/after comparison the README's speed figures come from)."""
import os
import subprocess
import time

import bench
import train
from conftest import ROOT, run


def test_cpu_pressure_reads_the_psi_total_and_grows():
    a = bench.cpu_pressure()
    assert a is not None and a >= 0    # Linux with PSI, as this project's machines and CI
    sum(i * i for i in range(200000))
    assert bench.cpu_pressure() >= a


def test_rows_carry_their_cpu_wait_and_against_alternates_the_two_codes(tmp_path):
    p = run('bench.py', '--presets', 'cpu', '--modes', 'fp32', '--batch_size', '2', '--steps', '1', '--warmup', '0',
            '--against', ROOT)
    rows = [l for l in p.stdout.splitlines() if l.startswith('| cpu |')]
    name = ROOT.name
    assert [r.split('|')[3].strip() for r in rows] == [name, 'this', 'this', name]   # A B B A
    for r in rows:
        cells = [c.strip() for c in r.strip('|').split('|')]
        assert cells[3] == '474,180'                    # the cpu preset's parameters, from either copy
        assert cells[-1].endswith('%') or 'busy' in cells[-1]


def test_gpu_check_script_runs_its_cpu_safe_parts_into_one_report(tmp_path):
    """gpu_check.sh at toy sizes on the CPU: the CUDA tests are skipped with their reason, the bench
    rows have figures, and the torchrun run stops and resumes."""
    report = tmp_path / 'report.md'
    p = subprocess.run(['bash', str(ROOT / 'gpu_check.sh'), str(report)], env=dict(os.environ, HVAE_GPU_CHECK_CPU='1'),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    text = report.read_text()
    assert 'needs a CUDA GPU' in text and 'skipped' in text
    rows = [l for l in text.splitlines() if l.startswith('| cpu |')]
    assert [r.split('|')[2].strip() for r in rows] == ['fp32', 'fp32+ckpt']
    assert all(float(r.split('|')[5]) > 0 for r in rows)                    # train img/s
    assert rows[0].split('|')[12] == rows[1].split('|')[12]                # same loss with and without ckpt
    assert 'resumed from step 2' in text and '\nstep 4 |' in text and 'every part ran' in text


def test_gpu_check_script_refuses_before_any_work_what_would_lose_its_report(tmp_path):
    script = ['bash', str(ROOT / 'gpu_check.sh')]
    env = dict(os.environ, HVAE_GPU_CHECK_CPU='1')
    p = subprocess.run(script + [str(tmp_path / 'nowhere' / 'r.md')], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and 'cannot write the report' in p.stderr and 'CUDA' not in p.stdout
    p = subprocess.run(script + [str(tmp_path / 'r.md')], env=dict(env, PYTHON='/nonexist/python'), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and 'no /nonexist/python here' in p.stderr


def test_ffhq1024_is_narrowed_as_the_reference_and_its_activations_fit_a_gpu():
    """16 channels at 1024 px, 32 at 512, 64 at 256 (the reference's custom_width_str): one image's
    activations drop from about 74 GiB (512 channels everywhere) to about 11, and to about 3 with
    --grad_checkpoint (meta-device counts)."""
    from test_model import closed_form_count
    config = train.make_config(train.parse_args(['--preset', 'ffhq1024']))
    assert closed_form_count(config) == 109_366_904
    plain, ckpt = bench.activation_gib('ffhq1024')
    assert 10 < plain < 12 and 2.5 < ckpt < 3.5
    cifar_plain, cifar_ckpt = bench.activation_gib('cifar10', 16)
    assert 7 < cifar_plain < 9 and cifar_ckpt < cifar_plain / 3   # with weights and optimiser: the 11 GiB peak at batch 16


def test_interleave_takes_the_modes_steps_in_turns_and_rates_them_against_the_first(monkeypatch):
    """One process, the order of the modes rotated each round; a mode twice as slow is 0.5x."""
    calls = []

    def fake_prepare(preset, batch_size, mode, device):
        def step():
            calls.append(mode)
            time.sleep({'a': 0.01, 'b': 0.02, 'c': 0.01}[mode])
        return step, None, None, None, None, None
    monkeypatch.setattr(bench, 'prepare', fake_prepare)
    rows = bench.interleave('cpu', 4, ['a', 'b', 'c'], steps=3, warmup=1, device='cpu')
    assert calls == ['a', 'b', 'c'] + ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']   # warm-up, then rotated rounds
    ratio = {r['mode']: r['ratio'] for r in rows}
    assert ratio['a'] == 1.0 and 0.3 < ratio['b'] < 0.7 and 0.6 < ratio['c'] < 1.6
    assert 100 < rows[0]['train_ips'] < 400                                # 4 images in ~10 ms


def test_interleave_runs_real_modes_and_refuses_what_one_process_cannot_compare():
    p = run('bench.py', '--interleave', '--presets', 'cpu', '--modes', 'fp32', 'cl', '--batch_size', '2',
            '--steps', '2', '--warmup', '0')
    rows = [[c.strip() for c in l.strip('|').split('|')] for l in p.stdout.splitlines() if l.startswith('| cpu |')]
    assert [r[1] for r in rows] == ['fp32', 'cl'] and rows[0][3] == '1.000x' and float(rows[1][2]) > 0
    for bad in (['--against', str(ROOT)], ['--modes', 'fp32', 'fp32+notf32']):
        p = run('bench.py', '--interleave', '--presets', 'cpu', *bad, check=False)
        assert p.returncode != 0 and '--interleave compares modes' in p.stderr
