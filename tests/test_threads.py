"""trainer.num_threads: the free-core rule, the /proc/stat reading, and the policy over a run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from headkit.engine import threads as T
from headkit.errors import InvalidConfigValue


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_for_uses_the_free_cores():
    assert T.threads_for(0.0, 2) == 2
    assert T.threads_for(0.2, 2) == 2      # a light background load leaves both cores
    assert T.threads_for(0.6, 2) == 1      # a job on most of a core takes it
    assert T.threads_for(1.0, 2) == 1
    assert T.threads_for(3.5, 2) == 1      # never below one
    assert T.threads_for(2.9, 8) == 5
    assert T.threads_for(30.0, 64, limit=2) == 2   # a 2-CPU quota on a busy 64-core host: still 2
    assert T.threads_for(1.0, 2, limit=1) == 1     # OMP_NUM_THREADS=1
    assert T.threads_for(6.9, 8, limit=2) == 1     # the cap does not hide the host's load


def test_others_busy_subtracts_own_cpu_time():
    before = T.CpuSample(busy=100.0, own=10.0, wall=0.0)
    after = T.CpuSample(busy=104.0, own=12.0, wall=2.0)   # 2 cores busy for 2 s, 1 of them ours
    assert T.others_busy(before, after) == pytest.approx(1.0)
    assert T.others_busy(before, T.CpuSample(100.5, 11.0, 1.0)) == 0.0  # clock ticks lag: never < 0


def test_sample_cpu_reads_the_usable_cpus_of_proc_stat(tmp_path):
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    tick = os.sysconf("SC_CLK_TCK")
    lines = ["cpu  999 0 999 999 0 0 0 0 0 0"]  # the total line is not read
    for c in range(max(cpus) + 2):  # one CPU outside the affinity mask
        # user nice system idle iowait irq softirq steal: busy = 10 + 1 + 5 + 2 + 1 + 1 = 20 ticks
        lines.append(f"cpu{c} 10 1 5 500 7 2 1 1 0 0")
    lines.append("intr 12345 0 0")
    path = tmp_path / "stat"
    path.write_text("\n".join(lines) + "\n")
    sample = T.sample_cpu(str(path))
    assert sample.busy == pytest.approx(20 * len(cpus) / tick)
    assert T.sample_cpu(str(tmp_path / "missing")) is None


def test_setting_is_checked():
    for good in (None, "auto", 1, 3):
        T.check_setting(good)
    for bad in (0, -1, True, "two", 1.5):
        with pytest.raises(InvalidConfigValue, match="trainer.num_threads"):
            T.check_setting(bad)


def test_fixed_and_default_settings(keep_threads):
    assert T.ThreadPolicy(1).start() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert T.ThreadPolicy(None).start() == 2  # torch's count is left alone
    assert T.ThreadPolicy(1).update() is None  # only auto changes during a run


def test_auto_follows_other_load(monkeypatch, keep_threads):
    """Scripted samples: quiet at the start (2 threads), then another job on one core (1 thread),
    then quiet again (2); checks closer together than check_seconds do nothing."""
    samples = iter([T.CpuSample(0.0, 0.0, 0.0), T.CpuSample(0.02, 0.0, 0.2),    # start: 0.1 busy
                    T.CpuSample(20.0, 10.0, 10.2),                                 # 1 core of others
                    T.CpuSample(30.0, 20.0, 20.2)])                                # quiet again
    clock = iter([5.0, 10.2, 20.2])
    monkeypatch.setattr(T, "sample_cpu", lambda path="": next(samples))
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    policy = T.ThreadPolicy("auto", check_seconds=5.0)
    policy.cpus = policy.watched = 2
    assert policy.start() == 2
    assert policy.update() is None          # 4.8 s since the last sample: not yet
    assert policy.update() == 1             # another process kept one core busy
    assert torch.get_num_threads() == 1
    assert policy.update() == 2             # it ended
    assert torch.get_num_threads() == 2


def test_auto_without_proc_stat_uses_every_usable_cpu(tmp_path, keep_threads):
    policy = T.ThreadPolicy("auto", stat_path=str(tmp_path / "missing"))
    assert policy.start() == policy.cpus == T.usable_cpus()
    assert policy.update() is None


def test_trainer_config_defaults_to_auto_and_rejects_bad_values():
    from hydra import compose, initialize_config_dir

    from headkit.engine.trainer import validate_config

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        assert compose("train").trainer.num_threads == "auto"
        bad = compose("train", overrides=["trainer.num_threads=0"])
    with pytest.raises(InvalidConfigValue, match=r"trainer\.num_threads=0"):
        validate_config(bad)


def test_omp_num_threads_caps_auto(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    uncapped = T.usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert T.usable_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")  # ignored, as OpenMP ignores it
    assert T.usable_cpus() == uncapped


def test_other_scripts_name_their_own_key():
    with pytest.raises(InvalidConfigValue, match=r"^invalid config value num_threads=0:"):
        T.ThreadPolicy(0, key="num_threads")
