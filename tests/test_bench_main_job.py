"""benchmarks/bench_main_job.py: the side-by-side table of two commits' main jobs."""

from tests.conftest import load_repo_module


def test_table_reports_medians_and_the_speed_up():
    bench = load_repo_module("benchmarks/bench_main_job.py")
    results = {"before": [{"wall": 600.0, "train": 500.0, "psnr": 30.7, "ssim": 0.962},
                          {"wall": 660.0, "train": 540.0, "psnr": 30.5, "ssim": 0.960},
                          {"wall": 700.0, "train": 580.0, "psnr": 30.6, "ssim": 0.961}],
               "after": [{"wall": 240.0, "train": 180.0, "psnr": 30.6, "ssim": 0.961},
                         {"wall": 250.0, "train": 190.0, "psnr": 30.4, "ssim": 0.960},
                         {"wall": 300.0, "train": 200.0, "psnr": 30.8, "ssim": 0.962}]}
    text = bench.table({"before": "abc", "after": "HEAD"}, results)
    assert "| before (`abc`) | 11 min 0 s | 540 s | 30.60 / 0.9610 |" in text
    assert "| after (`HEAD`) | 4 min 10 s | 190 s | 30.60 / 0.9610 |" in text
    assert "| speed-up | **2.64x** | 2.84x | |" in text
    assert "3 job(s) per commit" in text
