"""What every rank and probe process of an attempt gets in its environment (launch.py)."""

from __future__ import annotations

from sftui import launch


def test_ranks_run_with_expandable_segments_unless_the_user_chose(monkeypatch):
    """The caching allocator's fixed segments fragment under varying lengths (115 GiB reserved for
    33 GiB allocated on an H200): ranks and the probe get expandable segments by default, and a
    PYTORCH_CUDA_ALLOC_CONF of the user's own is passed on as it is."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    env = launch.rank_env(0, 2, 29500, 1, [0, 1])
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert launch.allocator_conf() == ("expandable_segments:True", False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert launch.rank_env(1, 2, 29500, 1, [0, 1])["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert launch.allocator_conf() == ("max_split_size_mb:512", True)
