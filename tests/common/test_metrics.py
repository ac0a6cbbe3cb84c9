import torch

from common.metrics import (
    MetricsLogger,
    peak_memory_mb,
    read_metrics,
    reset_peak_memory,
)


def test_metrics_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log(1, {"loss": torch.tensor(0.5), "lr": 1e-4})
        log.log(2, {"loss": 0.25, "name": "x"})
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": 0.25, "name": "x"}]
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "off", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "off").exists()


def test_peak_memory_sees_a_large_allocation():
    reset_peak_memory()
    base = peak_memory_mb()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    grown = peak_memory_mb()
    del x
    assert grown - base > 50
