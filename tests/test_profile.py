"""`tierkv profile`: runs without CUDA, saves the documented JSON, plots or fails cleanly, rejects bad
arguments with status 2 naming the argument; a saved profile sets TierConfig's auto defaults."""

import json
import math
import os
import sys

import pytest
import torch

from tierkv import profiles, profiling
from tierkv.cli.main import main
from tierkv.config import DEFAULT_CHUNK_LENGTHS, DEFAULT_PREFETCH_DEPTH, TierConfig
from tierkv.errors import ConfigError
from tierkv.formats import ChunkLayout

LENGTHS = (16, 64)
FORMATS = ("bf16", "int4")
TOKENS = 256


def _quick_args(tmp, device="cpu"):
    return ["profile", "--device", device, "--quick", "--disk-dir", str(tmp), "--sizes", "64KiB", "1MiB",
            "--chunk-lengths", *map(str, LENGTHS), "--formats", *FORMATS, "--tokens", str(TOKENS)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One quick CPU run with --json and --plot, shared by the tests that read what it saved."""
    tmp = tmp_path_factory.mktemp("profile")
    disk = tmp / "disk"
    disk.mkdir()
    out, png = tmp / "profile.json", tmp / "profile.png"
    args = _quick_args(disk) + ["--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(png)]
    except ImportError:
        png = None
    assert main(args) == 0
    return {"json": str(out), "data": json.loads(out.read_text()), "png": png, "disk": disk}


# --- the run and its JSON ------------------------------------------------------------------------
TOP = ("schema", "schema_version", "date", "command", "versions", "git_commit", "device", "backend", "backends",
       "settings", "transfers", "gather", "disk", "effective", "recommendations")


def test_json_has_the_documented_fields(saved):
    d = saved["data"]
    doc = profiles.__doc__
    assert set(d) == set(TOP)
    assert d["schema"] == profiles.SCHEMA and d["schema_version"] == profiles.SCHEMA_VERSION

    def documented(keys):  # every key the JSON holds is named in the module docstring's schema
        for k in keys:
            assert k in doc, f"field {k!r} is not documented in tierkv.profiles"

    documented(d)
    assert set(d["versions"]) >= {"tierkv", "python", "torch", "cuda"}
    assert d["versions"]["torch"] == torch.__version__
    documented(d["versions"])
    assert d["device"]["name"] == "cpu" and d["device"]["cuda"] is False
    documented(d["device"])
    documented(d["settings"])
    for section in ("transfers", "gather", "disk"):
        documented(d[section])
        for row in d[section]["rows"]:
            documented(row)
    for row in d["effective"]:
        documented(row)
    documented(d["recommendations"])
    for b in d["recommendations"]["basis"].values():
        documented(b)
    assert d["command"][:2] == ["tierkv", "profile"] and "--quick" in d["command"]
    assert d["date"][:4].isdigit()


def test_cpu_run_says_there_is_no_cuda_device(saved):
    d = saved["data"]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert d["transfers"] == {"available": False, "reason": "no CUDA device", "rows": []}
    assert d["backend"] == "torch"
    assert {s["reason"] for s in d["gather"]["skipped"]} == {"no CUDA device"}
    gpu = [r for r in d["effective"] if r["tier"] == "gpu"]
    assert gpu and all(r["gbps"] is None and r["via"] == "no CUDA device" for r in gpu)


def test_gather_rows_count_the_bytes_they_move(saved):
    d = saved["data"]
    rows = d["gather"]["rows"]
    assert {(r["format"], r["chunk_tokens"]) for r in rows} == {(f, L) for f in FORMATS for L in LENGTHS}
    for r in rows:
        nbytes = ChunkLayout(r["format"], r["chunk_tokens"], 8, 128).nbytes
        assert r["chunk_bytes"] == nbytes
        assert r["bytes_read"] == r["chunks"] * nbytes
        assert r["bytes_written"] == 2 * r["chunks"] * r["chunk_tokens"] * 8 * 128 * 2  # K and V in bf16
        assert r["seconds"] > 0
        assert r["gbps"] == pytest.approx((r["bytes_read"] + r["bytes_written"]) / r["seconds"] / 1e9)
        assert r["read_gbps"] == pytest.approx(r["bytes_read"] / r["seconds"] / 1e9)


def test_disk_rows_and_no_leftovers(saved):
    d = saved["data"]["disk"]
    assert d["available"]
    sizes = {ChunkLayout("bf16", L, 8, 128).nbytes for L in LENGTHS}
    ops = {(r["path"], r["op"]) for r in d["rows"]}
    assert {("raw", "write"), ("raw", "read_warm"), ("raw", "read_cold"), ("store", "write"), ("store", "read_warm"),
            ("store", "read_cold"), ("store", "read_cold_parallel")} <= ops
    assert ("raw", "read_direct") in ops or d["o_direct"]  # measured, or the reason it could not be
    for r in d["rows"]:
        assert r["chunk_bytes"] in sizes and r["gbps"] > 0 and r["bytes"] == r["chunks"] * r["chunk_bytes"]
    assert os.listdir(saved["disk"]) == []  # the measurement directory is removed


def test_recommendations_follow_the_measurements(saved):
    d = saved["data"]
    rec = d["recommendations"]
    assert set(rec["chunk_length"]) == set(FORMATS) == set(rec["prefetch_depth"])
    for fmt in FORMATS:
        host = {r["chunk_tokens"]: r["gbps"] for r in d["gather"]["rows"] if r["format"] == fmt and r["source"] == "host"}
        L = rec["chunk_length"][fmt]
        assert L == min(n for n, g in host.items() if g >= profiling.Rules().plateau * max(host.values()))
        assert 1 <= rec["prefetch_depth"][fmt] <= profiling.Rules().depth_max
    assert rec["chunk_length_default"] == rec["chunk_length"]["bf16"]
    assert profiles.load(saved["json"])["recommendations"] == rec


def test_plot_is_a_png(saved):
    if saved["png"] is None:
        pytest.skip("matplotlib is not installed")
    with open(saved["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_exits_2_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    called = []
    monkeypatch.setattr(profiling, "run_profile", lambda *a, **k: called.append(1))
    assert main(_quick_args(tmp_path) + ["--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "matplotlib" in err and "tierkv[plot]" in err
    assert not called and not (tmp_path / "p.png").exists()


def test_show_prints_and_plots_a_saved_profile(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(profiling, "run_profile", lambda *a, **k: pytest.fail("--show must not measure"))
    args = ["profile", "--show", saved["json"]]
    if saved["png"] is not None:
        args += ["--plot", str(tmp_path / "again.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "recommendations" in out and "gather + dequantize" in out
    if saved["png"] is not None:
        assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({k: v for k, v in saved["data"].items() if k != "gather"}))
    assert main(["profile", "--show", str(broken)]) == 2
    assert "--show" in capsys.readouterr().err


# --- derived figures on known numbers -------------------------------------------------------------
def _synthetic(host_gbps, disk_parallel_gbps, disk_latency_s, nbytes_per_token=4096):
    lengths = sorted(host_gbps)
    rows = [{"format": "bf16", "backend": "ext", "source": "host", "chunk_tokens": L,
             "chunk_bytes": L * nbytes_per_token, "gbps": g, "read_gbps": g / 2} for L, g in host_gbps.items()]
    disk = []
    for L in lengths:
        b = L * nbytes_per_token
        disk.append({"path": "store", "op": "read_cold_parallel", "chunk_bytes": b, "gbps": disk_parallel_gbps,
                     "latency_s": None})
        disk.append({"path": "store", "op": "read_cold", "chunk_bytes": b, "gbps": 1.0, "latency_s": disk_latency_s})
    return {"settings": {"formats": ["bf16"], "chunk_lengths": lengths}, "backend": "ext",
            "device": {"cuda": True}, "gather": {"rows": rows}, "disk": {"rows": disk}}


def test_recommended_length_is_the_knee_and_depth_follows_littles_law():
    r = _synthetic({16: 10.0, 32: 20.0, 64: 27.5, 128: 30.0, 256: 29.0}, disk_parallel_gbps=4.0, disk_latency_s=1e-3)
    eff, rec = profiling.derive(r)
    assert rec["chunk_length"]["bf16"] == 64  # 27.5 >= 0.9 * 30, 20 is not
    b = 64 * 4096
    r_cpu = 27.5 / 2 * 1e9 / b  # chunks/s the host gather consumes (read bytes)
    r_disk = 4.0 * 1e9 / b
    assert rec["basis"]["bf16"]["consume_chunks_per_s"] == pytest.approx(r_cpu)
    assert rec["prefetch_depth"]["bf16"] == math.ceil(min(r_cpu, r_disk) * 1e-3)
    disk64 = next(e for e in eff if e["tier"] == "disk" and e["chunk_tokens"] == 64)
    assert disk64["gbps"] == pytest.approx(min(4.0, 27.5 / 2))
    # a slow disk with a long latency needs more chunks in flight, up to the cap
    _, rec = profiling.derive(_synthetic({16: 10.0, 64: 10.0}, disk_parallel_gbps=40.0, disk_latency_s=0.5))
    assert rec["chunk_length"]["bf16"] == 16 and rec["prefetch_depth"]["bf16"] == profiling.Rules().depth_max


def test_interpolation_is_log_log_and_clamped():
    pts = [(1 << 16, 1.0), (1 << 20, 16.0)]
    assert profiling.interpolate(pts, 1 << 18) == pytest.approx(4.0)
    assert profiling.interpolate(pts, 1 << 10) == 1.0 and profiling.interpolate(pts, 1 << 30) == 16.0
    assert profiling.interpolate([], 5) is None


# --- TierConfig(profile=...) --------------------------------------------------------------------------
def _write_profile(path, chunk_length, depth, **extra):
    recs = {"default_format": "bf16", "chunk_length": chunk_length, "prefetch_depth": depth,
            "chunk_length_default": extra.pop("chunk_length_default", 64),
            "prefetch_depth_default": extra.pop("prefetch_depth_default", 2)}
    data = {"schema": profiles.SCHEMA, "schema_version": profiles.SCHEMA_VERSION, "recommendations": recs, **extra}
    path.write_text(json.dumps(data))
    return str(path)


def test_lengths_around():
    assert profiles.lengths_around(64) == DEFAULT_CHUNK_LENGTHS
    assert profiles.lengths_around(128) == (32, 64, 128, 256, 512)
    assert profiles.lengths_around(16) == (16, 32, 64)
    assert profiles.lengths_around(8) == (8, 16, 32)


def test_auto_defaults_without_a_profile():
    cfg = TierConfig()
    assert cfg.chunk_lengths == DEFAULT_CHUNK_LENGTHS == (16, 32, 64, 128, 256)
    assert cfg.prefetch_depth == DEFAULT_PREFETCH_DEPTH == 2


def test_profile_sets_defaults_and_explicit_values_win(tmp_path):
    p = _write_profile(tmp_path / "p.json", {"bf16": 128, "int4": 256}, {"bf16": 5, "int4": 3})
    cfg = TierConfig(profile=p)
    assert cfg.chunk_lengths == (32, 64, 128, 256, 512) and cfg.prefetch_depth == 5
    cfg4 = TierConfig(profile=p, format="int4")
    assert cfg4.chunk_lengths == (64, 128, 256, 512, 1024) and cfg4.prefetch_depth == 3
    # a format the profile did not measure takes its defaults
    assert TierConfig(profile=p, format="int8").chunk_lengths == DEFAULT_CHUNK_LENGTHS
    explicit = TierConfig(profile=p, chunk_lengths=(16, 48), prefetch_depth=0)
    assert explicit.chunk_lengths == (16, 48) and explicit.prefetch_depth == 0
    half = TierConfig(profile=p, prefetch_depth=7)
    assert half.chunk_lengths == (32, 64, 128, 256, 512) and half.prefetch_depth == 7
    # replace keeps auto fields auto and explicit ones explicit
    assert cfg.replace(window=9).chunk_lengths == (32, 64, 128, 256, 512)
    assert cfg.replace(format="int4").prefetch_depth == 3
    off = cfg.replace(profile=None)
    assert off.chunk_lengths == DEFAULT_CHUNK_LENGTHS and off.prefetch_depth == 2
    assert half.replace(profile=None).prefetch_depth == 7
    assert isinstance(cfg.chunk_lengths, tuple) and all(isinstance(n, int) for n in cfg.chunk_lengths)


def test_saved_profile_drives_the_config(saved):
    rec = saved["data"]["recommendations"]
    cfg = TierConfig(profile=saved["json"], format="int4")
    assert cfg.prefetch_depth == rec["prefetch_depth"]["int4"]
    assert rec["chunk_length"]["int4"] in cfg.chunk_lengths
    assert cfg.chunk_lengths == profiles.lengths_around(rec["chunk_length"]["int4"])


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a tierkv profile"),
        (json.dumps({"schema": "tierkv-profile", "schema_version": 99, "recommendations": {}}), "schema_version"),
        (json.dumps({"schema": "tierkv-profile", "schema_version": 1}), "recommendations"),
        (json.dumps({"schema": "tierkv-profile", "schema_version": 1,
                     "recommendations": {"chunk_length_default": 64, "prefetch_depth_default": 2}}),
         "recommendations.chunk_length"),
        (json.dumps({"schema": "tierkv-profile", "schema_version": 1,
                     "recommendations": {"chunk_length_default": 64, "prefetch_depth_default": 2,
                                         "chunk_length": {"bf16": 0}, "prefetch_depth": {}}}),
         "recommendations.chunk_length.bf16"),
        (json.dumps({"schema": "tierkv-profile", "schema_version": 1,
                     "recommendations": {"chunk_length_default": "64", "prefetch_depth_default": 2,
                                         "chunk_length": {}, "prefetch_depth": {}}}),
         "chunk_length_default"),
    ],
)
def test_bad_profile_is_a_config_error_naming_profile(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ConfigError, match=f"profile.*{match}"):
        TierConfig(profile=str(p))
    with pytest.raises(ConfigError, match="profile"):  # read even when every field is explicit
        TierConfig(profile=str(p), chunk_lengths=(32,), prefetch_depth=1)


# --- bad arguments ----------------------------------------------------------------------------------
def _bad_args(tmp):
    f = tmp / "afile"
    f.write_text("x")
    cases = [
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda:0"], "--device"),
        (["--disk-dir", str(tmp / "missing")], "--disk-dir"),
        (["--disk-dir", str(f)], "--disk-dir"),
        (["--sizes", "0"], "--sizes"),
        (["--sizes", "-1MiB"], "--sizes"),
        (["--sizes", "3 parsecs"], "--sizes"),
        (["--chunk-lengths", "0"], "--chunk-lengths"),
        (["--chunk-lengths", "16", "abc"], "--chunk-lengths"),
        (["--tokens", "-5"], "--tokens"),
        (["--formats", "int3"], "--formats"),
        (["--head-dim", "12"], "--head-dim"),
        (["--head-dim", "48"], "--head-dim"),
        (["--json", str(tmp / "missing" / "p.json")], "--json"),
        (["--json", str(tmp)], "--json"),
        (["--plot", str(tmp / "missing" / "p.png")], "--plot"),
        (["--show", str(tmp / "missing.json")], "--show"),
        (["--show", str(f)], "--show"),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((["--disk-dir", str(ro)], "--disk-dir"))
        cases.append((["--json", str(ro / "p.json")], "--json"))
    return cases


def test_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(profiling, "run_profile", lambda *a, **k: called.append(1))
    for extra, name in _bad_args(tmp_path):
        args = ["profile", "--quick", "--disk-dir", str(tmp_path)] + extra
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert name in err, (extra, err)
    assert not called


# --- on a GPU (skipped without one) ------------------------------------------------------------------
@pytest.mark.gpu
def test_quick_gpu_run(tmp_path):
    from tierkv import ops

    out = tmp_path / "p.json"
    assert main(_quick_args(tmp_path, "cuda:0") + ["--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["device"]["cuda"] and d["transfers"]["available"]
    assert {(r["direction"], r["memory"]) for r in d["transfers"]["rows"]} == {
        (a, b) for a in ("h2d", "d2h") for b in ("pinned", "pageable")}
    measured = {(r["backend"], r["source"]) for r in d["gather"]["rows"]}
    assert measured == {(b, s) for b in ops.available_backends() for s in ("device", "host")}
    assert d["backend"] == ops.backend()
    assert all(r["gbps"] is not None for r in d["effective"] if r["tier"] == "gpu")
