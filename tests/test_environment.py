"""The environment a run names in its records: packages, CPU features, git commit."""

import subprocess

from lsgd_jax.training.environment import (
    XLA_CPU_FLAGS,
    cpu_description,
    git_commit,
    package_versions,
)


def test_cpu_description_keeps_the_model_and_only_the_flags_xla_uses(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\n"
                    "flags\t\t: fpu sse4_2 avx2 fma avx512f ht\n\n"
                    "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: avx512bw\n")
    got = cpu_description(str(info))
    assert got["model"] == "Example CPU @ 2.0GHz"  # the first processor's block
    assert got["xla_flags"] == ["sse4_2", "avx2", "fma", "avx512f"]  # in XLA_CPU_FLAGS order
    assert set(got["xla_flags"]) <= set(XLA_CPU_FLAGS)


def test_package_versions_name_absent_packages_as_none():
    got = package_versions(("numpy", "no-such-package-here"))
    import numpy

    assert got == {"numpy": numpy.__version__, "no-such-package-here": None}


def test_git_commit_names_head_and_a_dirty_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert git_commit(str(tmp_path)) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "f").write_text("a")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "f").write_text("b")
    assert git_commit(str(tmp_path)) == head + "+dirty"
