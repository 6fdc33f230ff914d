"""bench.py: every row says how long it waited for a CPU, and --against runs a second checkout's
code in the same invocation (the before/after comparison the README's speed figures come from)."""
import bench
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
