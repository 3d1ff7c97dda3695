"""gnsrepro.provenance: which commit made a result, and whether code (not docs/) differed from it."""

import shutil
import subprocess

import pytest

from gnsrepro.provenance import code_version

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dirty_counts_code_anywhere_in_the_checkout_but_not_docs(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "docs" / "reproduce").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "top.py").write_text("y = 1\n")
    (tmp_path / "docs" / "reproduce" / "REPORT.md").write_text("old\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    cwd = tmp_path / "pkg"  # asked from inside a subdirectory, as the package asks from its own
    assert code_version(cwd) == (head, False)
    (tmp_path / "docs" / "reproduce" / "REPORT.md").write_text("re-published\n")
    (tmp_path / "untracked.py").write_text("z = 1\n")
    assert code_version(cwd) == (head, False)  # a re-published report and an untracked file are not code changes
    (tmp_path / "top.py").write_text("y = 2\n")  # outside the asking directory: still the checkout's code
    assert code_version(cwd) == (head, True)


def test_outside_a_checkout_nothing_is_known(tmp_path):
    assert code_version(tmp_path) == (None, None)


def test_a_copied_tree_names_the_commit_it_was_made_from(tmp_path, monkeypatch):
    """GNSREPRO_COMMIT (gpu_session.sh's COMMIT=): that commit, whether the files differ from it unknown, in or out
    of a checkout; unset or blank, git decides."""
    monkeypatch.setenv("GNSREPRO_COMMIT", " 2af780f ")
    assert code_version(tmp_path) == ("2af780f", None)
    monkeypatch.setenv("GNSREPRO_COMMIT", " ")
    assert code_version(tmp_path) == (None, None)
