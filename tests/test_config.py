import pytest

from tierkv.config import TierConfig, format_size, parse_size
from tierkv.errors import ConfigError, TierKVError


@pytest.mark.parametrize(
    "text,expected",
    [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1.5GiB", 3 << 29), ("10 KB", 10_000), ("7", 7), ("2gib", 2 << 30), (123, 123)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "4 parsecs", "GiB", "", "1e9", -5, True, None, [1]])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match="gpu_budget"):
        parse_size(bad, "gpu_budget")


def test_budgets_normalised_to_bytes():
    cfg = TierConfig(gpu_budget="512MiB", cpu_budget=1 << 30, disk_budget="1GB")
    assert (cfg.gpu_budget, cfg.cpu_budget, cfg.disk_budget) == (512 << 20, 1 << 30, 10**9)
    assert format_size(cfg.gpu_budget) == "512.0 MiB"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"gpu_budget": "-1"}, "gpu_budget"),
        ({"cpu_budget": "3 furlongs"}, "cpu_budget"),
        ({"window": -1}, "window"),
        ({"sink": 1.5}, "sink"),
        ({"budget": -3}, "budget"),
        ({"format": "int3"}, "format"),
        ({"group_size": 24}, "group_size"),
        ({"group_size": 4}, "group_size"),
        ({"chunk_lengths": ()}, "chunk_lengths"),
        ({"chunk_lengths": (16, 0)}, "chunk_lengths"),
        ({"importance_decay": 0}, "importance_decay"),
        ({"miss_policy": "hope"}, "miss_policy"),
        ({"scoring": "psychic"}, "scoring"),
        ({"selection": "per-layer"}, "selection"),
        ({"profile": "/nonexistent/profile.json"}, "profile"),
    ],
)
def test_config_rejects_nonsense(kwargs, field):
    with pytest.raises(ConfigError, match=field) as e:
        TierConfig(**kwargs)
    assert isinstance(e.value, TierKVError)


def test_disk_path_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="disk_path.*file"):
        TierConfig(disk_path=str(f))
    assert TierConfig(disk_path=str(tmp_path / "new")).disk_path == str(tmp_path / "new")


def test_frozen_and_replace():
    cfg = TierConfig()
    with pytest.raises(Exception):
        cfg.window = 3
    assert cfg.replace(window=7).window == 7
    with pytest.raises(ConfigError):
        cfg.replace(window=-7)
